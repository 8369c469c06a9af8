"""CPU speed of every candidate of a run, measured side by side in one process.

Machines like ours are noisy: a measurement taken a minute later can be 20% off. The
gate asks whether a compressed model is ≥1.3× faster than its parent, so candidates are
loaded together and measured in interleaved rounds (the order rotating each round) on
the *same* texts — a fixed, seeded sample of the test split — and each figure is a
median over rounds. Memory is measured in a fresh process per model (peak resident set
after loading it and classifying one batch), because in a shared process the models'
memory cannot be told apart.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
from prefect import task

from domainflow.logs import run_logger
from domainflow.modeling import LoadedClassifier, load_classifier, predict_proba
from domainflow.records import DatasetRef, Evaluation
from tasks.caching import CODE_AND_INPUTS, require_shared

LATENCY_REQUESTS = 96
THROUGHPUT_TEXTS = 512
THROUGHPUT_BATCH = 32
ROUNDS = 3
SPEED_SEED = 0


def speed_texts(test_texts: Sequence[str], count: int, seed: int = SPEED_SEED) -> list[str]:
    """A fixed sample of the test texts, identical for every candidate of a dataset."""
    if len(test_texts) <= count:
        return list(test_texts)
    return random.Random(seed).sample(list(test_texts), count)


def _batch32_seconds(loaded: LoadedClassifier, texts: Sequence[str]) -> float:
    started = time.perf_counter()
    predict_proba(loaded, texts, batch_size=THROUGHPUT_BATCH)
    return time.perf_counter() - started


def _batch1_latencies(loaded: LoadedClassifier, texts: Sequence[str]) -> list[float]:
    latencies = []
    for text in texts:
        started = time.perf_counter()
        predict_proba(loaded, [text], batch_size=1)
        latencies.append(time.perf_counter() - started)
    return latencies


@torch.inference_mode()
def measure_side_by_side(
    model_dirs: dict[str, str], texts: Sequence[str], rounds: int = ROUNDS
) -> dict[str, dict[str, float]]:
    """Throughput at batch 32 and latency at batch 1 of each model, interleaved over ``rounds``."""
    models = {name: load_classifier(path) for name, path in model_dirs.items()}
    batched = list(texts)[:THROUGHPUT_TEXTS]
    singles = list(texts)[:LATENCY_REQUESTS]
    per_round = [singles[i::rounds] for i in range(rounds)]
    for loaded in models.values():  # warm-up: allocator, kernels, tokenizer caches
        predict_proba(loaded, batched[:THROUGHPUT_BATCH], batch_size=THROUGHPUT_BATCH)
        predict_proba(loaded, singles[:4], batch_size=1)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    latencies: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            seconds[name].append(_batch32_seconds(models[name], batched))
            latencies[name].extend(_batch1_latencies(models[name], per_round[round_index]))
    results = {}
    for name in names:
        ordered = sorted(latencies[name])
        results[name] = {
            "texts_per_second_batch32": len(batched) / statistics.median(seconds[name]),
            "texts_per_second_batch1": len(ordered) / sum(ordered),
            "latency_ms_p50": 1000 * statistics.median(ordered),
            "latency_ms_p95": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        }
    return results


# The probe's own peak: VmHWM, the high-water mark of the process's address space, which exec starts afresh.
# Not ru_maxrss: Linux carries the forking parent's peak across exec into it (measured: a child of a 1.5 GB process
# reported 1,513 MB by ru_maxrss and 13 MB by VmHWM), so every candidate read as the pipeline's own size.
_RSS_PROBE = """
import json, resource, sys

def peak_kb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no procfs: the closest figure there is

from domainflow.modeling import load_classifier, predict_proba
texts = json.loads(sys.stdin.read())
before = peak_kb()
loaded = load_classifier(sys.argv[1])
predict_proba(loaded, texts, batch_size=32)
print(json.dumps({"before_kb": before, "peak_kb": peak_kb()}))
"""


def peak_rss_mb(model_dir: str, texts: Sequence[str]) -> float | None:
    """Peak resident memory (MB) of a fresh process that loads the model and classifies a batch; None if it fails."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, model_dir],
            input=json.dumps(list(texts)[:THROUGHPUT_BATCH]),
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])["peak_kb"] / 1024
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as exc:
        run_logger(__name__).warning("could not measure the memory of %s: %s", model_dir, exc)
        return None


def measure_speeds(evaluations: list[Evaluation], dataset: DatasetRef) -> list[Evaluation]:
    """The evaluations with their speed and memory figures filled in (pure: no Prefect needed)."""
    from datasets import load_from_disk

    texts = speed_texts(list(load_from_disk(dataset.path)["test"]["text"]), max(LATENCY_REQUESTS, THROUGHPUT_TEXTS))
    speeds = measure_side_by_side({e.candidate.name: e.candidate.path for e in evaluations}, texts)
    log = run_logger(__name__)
    measured = []
    for evaluation in evaluations:
        figures = dict(speeds[evaluation.candidate.name], peak_rss_mb=peak_rss_mb(evaluation.candidate.path, texts))
        log.info(
            "%s: %.0f texts/s at batch 32, p50 %.1f ms at batch 1",
            evaluation.candidate.name,
            figures["texts_per_second_batch32"],
            figures["latency_ms_p50"],
        )
        measured.append(evaluation.model_copy(update=figures))
    return measured


@task(name="measure-speed", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def measure_speed(evaluations: list[Evaluation], dataset: DatasetRef) -> list[Evaluation]:
    """Side-by-side CPU speed and memory of all candidates of a run."""
    require_shared(evaluations, dataset)
    return measure_speeds(evaluations, dataset)
