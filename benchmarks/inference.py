"""The deployed champion against Hugging Face's ``pipeline("text-classification")`` on the fp32 model.

Usage (from the repository root)::

    python benchmarks/inference.py                       # champion of customer_service under DOMAINFLOW_HOME
    python benchmarks/inference.py --threads 1 --max-texts 1000
    python benchmarks/inference.py --champion-dir DIR --fp32-dir DIR

Both sides run in this one process on the same texts (the domain's test split, a seeded
sample when ``--max-texts`` is given), in interleaved rounds whose order rotates, so that a
noisy shared machine slows both alike; figures are medians over rounds, and the ratios are
what to read.

* **baseline** — the fine-tuned fp32 model (the champion's parent) behind
  ``transformers.pipeline("text-classification")``, used as a user would: ``pipe(texts,
  batch_size=32, truncation=True)`` for throughput and ``pipe(text)`` per request for latency.
  The model is our mean-pooling classifier wrapped as a ``PreTrainedModel``
  (:mod:`domainflow.hf_pipeline`); its predictions are checked against our own fp32
  inference on every text, and the agreement is printed.
* **champion** — the registry's champion as serving loads it (``load_classifier`` +
  ``predict_proba``: length-sorted batches, one tokenizer call, int8 in ONNX Runtime or torch).

Printed: texts/s at batch 32 and at batch 1, p50/p95 latency of one-text requests, accuracy of
both on the texts, and the champion/baseline ratios, against the goal (≥ 4× the pipeline's
batch-32 throughput at ≤ 1 point of accuracy lost). ``--threads`` sets the threads of both
sides (torch and ONNX Runtime alike); run it once per setting to compare settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import labelled_test_texts  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()  # before transformers is imported: offline hub, quiet logs

import torch  # noqa: E402

GOAL_SPEEDUP = 4.0
GOAL_MAX_DROP_POINTS = 1.0
THROUGHPUT_BATCH = 32
NO_CHAMPION_HELP = """no champion for {domain} under {home}.
Make one (about 30-60 minutes on 2 busy cores) and run this again:
    DOMAINFLOW_HOME={home} domainflow run {domain}
or point at model folders: --champion-dir DIR --fp32-dir DIR"""


class SideSummary(TypedDict):
    """One side's figures, as reported."""

    name: str
    model_dir: str
    texts_per_second_batch32: float
    texts_per_second_batch1: float
    latency_ms_p50: float
    latency_ms_p95: float
    accuracy: float


@dataclass
class SideResult:
    """What one side measured: speed figures (medians over rounds) and its batch-32 predictions."""

    name: str
    model_dir: str
    batch32_seconds: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list, repr=False)

    def summary(self, texts: int, labels: Sequence[int]) -> SideSummary:
        ordered = sorted(self.latencies_s)
        return {
            "name": self.name,
            "model_dir": self.model_dir,
            "texts_per_second_batch32": texts / statistics.median(self.batch32_seconds),
            "texts_per_second_batch1": len(ordered) / sum(ordered),
            "latency_ms_p50": 1000 * statistics.median(ordered),
            "latency_ms_p95": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "accuracy": sum(p == y for p, y in zip(self.predictions, labels, strict=True)) / len(labels),
        }


def resolve_models(domain: str, champion_dir: str | None, fp32_dir: str | None) -> tuple[Path, Path]:
    """The champion's folder and its fp32 parent's: from the command line, else the registry."""
    from domainflow import settings
    from domainflow.modeling import read_metadata
    from domainflow.registry import ModelRegistry

    if champion_dir is None:
        champion = ModelRegistry(domain).champion()
        if champion is None:
            raise SystemExit(NO_CHAMPION_HELP.format(domain=domain, home=settings.home()))
        champion_path = champion.model_dir
        parent_path = (
            champion.lineage.get("parent_path") if champion.lineage.get("compression") else str(champion.model_dir)
        )
    else:
        champion_path, parent_path = Path(champion_dir), None
    if fp32_dir is not None:
        parent_path = fp32_dir
    elif parent_path is None and not read_metadata(champion_path).get("compression"):
        parent_path = str(champion_path)
    if parent_path is None or not Path(parent_path).is_dir():
        raise SystemExit(
            f"cannot find the fp32 parent of {champion_path} (lineage gives {parent_path!r}); pass --fp32-dir DIR"
        )
    return Path(champion_path), Path(parent_path)


def measure(
    sides: Mapping[str, tuple[Callable[[list[str]], list[int]], Callable[[str], object]]],
    results: dict[str, SideResult],
    texts: list[str],
    singles: list[str],
    rounds: int,
) -> None:
    """Interleaved rounds: each side classifies all ``texts`` at batch 32, then its share of one-text requests."""
    names = list(sides)
    per_round = [singles[i::rounds] for i in range(rounds)]
    for name in names:  # warm-up: allocators, kernels, tokenizer caches
        batch, single = sides[name]
        batch(texts[:THROUGHPUT_BATCH])
        for text in singles[:4]:
            single(text)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            batch, single = sides[name]
            started = time.perf_counter()
            predictions = batch(texts)
            results[name].batch32_seconds.append(time.perf_counter() - started)
            if not results[name].predictions:
                results[name].predictions = predictions
            for text in per_round[round_index]:
                started = time.perf_counter()
                single(text)
                results[name].latencies_s.append(time.perf_counter() - started)
            print(
                f"  round {round_index + 1}/{rounds}: {name} {len(texts) / results[name].batch32_seconds[-1]:.1f} "
                "texts/s at batch 32",
                flush=True,
            )


def run(args: argparse.Namespace) -> dict:
    from domainflow.hf_pipeline import text_classification_pipeline
    from domainflow.modeling import load_classifier, predict_proba

    if args.threads:
        torch.set_num_threads(args.threads)  # before loading: ONNX Runtime sessions take their thread count from torch
    champion_dir, fp32_dir = resolve_models(args.domain, args.champion_dir, args.fp32_dir)
    texts, labels = labelled_test_texts(args.domain, args.max_texts, args.seed)
    singles = texts[: args.latency_requests]

    champion = load_classifier(champion_dir)
    fp32 = load_classifier(fp32_dir)
    pipe = text_classification_pipeline(fp32_dir)
    label2id = pipe.model.config.label2id
    tokenizer_kwargs = {"truncation": True, "max_length": fp32.max_length}
    print(
        f"champion {champion_dir} ({champion.metadata.get('candidate')}, "
        f"{champion.metadata.get('compression') or 'fp32'})"
    )
    print(f"baseline {fp32_dir} ({fp32.metadata.get('candidate')}) behind transformers.pipeline('text-classification')")
    print(
        f"{len(texts)} texts, {len(singles)} one-text requests, {args.rounds} rounds, {torch.get_num_threads()} threads"
    )

    def pipeline_batch(batch: list[str]) -> list[int]:
        return [label2id[out["label"]] for out in pipe(batch, batch_size=THROUGHPUT_BATCH, **tokenizer_kwargs)]

    def champion_batch(batch: list[str]) -> list[int]:
        return predict_proba(champion, batch, batch_size=THROUGHPUT_BATCH).argmax(dim=1).tolist()

    sides = {
        "pipeline_fp32": (pipeline_batch, lambda text: pipe(text, **tokenizer_kwargs)),
        "champion": (champion_batch, lambda text: predict_proba(champion, [text], batch_size=1)),
    }
    results = {name: SideResult(name, str(champion_dir if name == "champion" else fp32_dir)) for name in sides}
    measure(sides, results, texts, singles, args.rounds)

    ours_fp32 = predict_proba(fp32, texts, batch_size=THROUGHPUT_BATCH).argmax(dim=1).tolist()
    agreement = sum(a == b for a, b in zip(results["pipeline_fp32"].predictions, ours_fp32, strict=True)) / len(texts)
    base = results["pipeline_fp32"].summary(len(texts), labels)
    best = results["champion"].summary(len(texts), labels)
    report = {
        "texts": len(texts),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "pipeline_agreement_with_our_fp32": agreement,
        "baseline": base,
        "champion": best,
        "speedup_batch32": best["texts_per_second_batch32"] / base["texts_per_second_batch32"],
        "speedup_batch1": best["texts_per_second_batch1"] / base["texts_per_second_batch1"],
        "latency_p50_ratio": base["latency_ms_p50"] / best["latency_ms_p50"],
        "latency_p95_ratio": base["latency_ms_p95"] / best["latency_ms_p95"],
        "accuracy_drop_points": 100 * (base["accuracy"] - best["accuracy"]),
        "champion_agreement_with_fp32": sum(
            a == b for a, b in zip(results["champion"].predictions, ours_fp32, strict=True)
        )
        / len(texts),
    }
    report["goal_met"] = (
        report["speedup_batch32"] >= GOAL_SPEEDUP and report["accuracy_drop_points"] <= GOAL_MAX_DROP_POINTS
    )
    return report


def print_report(report: dict) -> None:
    base, best = report["baseline"], report["champion"]
    rows = [
        ("texts/s, batch 32", "texts_per_second_batch32", "{:.1f}"),
        ("texts/s, batch 1", "texts_per_second_batch1", "{:.1f}"),
        ("latency p50 (ms), batch 1", "latency_ms_p50", "{:.2f}"),
        ("latency p95 (ms), batch 1", "latency_ms_p95", "{:.2f}"),
        ("accuracy", "accuracy", "{:.4f}"),
    ]
    print()
    print(f"{'':28s} {'pipeline fp32':>14s} {'champion':>14s}")
    for label, key, fmt in rows:
        print(f"{label:28s} {fmt.format(base[key]):>14s} {fmt.format(best[key]):>14s}")
    print()
    print(
        f"pipeline agrees with our fp32 inference on {100 * report['pipeline_agreement_with_our_fp32']:.2f}% of texts; "
        f"champion agrees with fp32 on {100 * report['champion_agreement_with_fp32']:.2f}%"
    )
    print(
        f"throughput ratio champion / pipeline: {report['speedup_batch32']:.2f}x at batch 32, "
        f"{report['speedup_batch1']:.2f}x at batch 1"
    )
    print(
        f"latency ratio pipeline / champion: p50 {report['latency_p50_ratio']:.2f}x, p95 "
        f"{report['latency_p95_ratio']:.2f}x"
    )
    print(
        f"accuracy: {100 * base['accuracy']:.2f}% -> {100 * best['accuracy']:.2f}% "
        f"({100 * (best['accuracy'] - base['accuracy']):+.2f} points)"
    )
    verdict = "met" if report["goal_met"] else "NOT met"
    print(f"goal (>= {GOAL_SPEEDUP:.0f}x batch-32 throughput, <= {GOAL_MAX_DROP_POINTS:.0f} point lost): {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--domain", default="customer_service", help="registered domain whose champion and test split are used"
    )
    parser.add_argument("--champion-dir", help="model folder to benchmark instead of the registry's champion")
    parser.add_argument(
        "--fp32-dir", help="fp32 model behind the pipeline (default: the champion's parent, from its lineage)"
    )
    parser.add_argument(
        "--max-texts", type=int, default=None, help="a seeded sample of this many test texts (default: all)"
    )
    parser.add_argument(
        "--latency-requests", type=int, default=300, help="one-text requests per side, spread over the rounds"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (figures are medians over rounds)")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for both sides (default: torch's default, one per core)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-texts sample")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if (
        args.rounds < 1
        or args.latency_requests < args.rounds
        or (args.max_texts is not None and args.max_texts < THROUGHPUT_BATCH)
    ):
        parser.error(f"need --rounds >= 1, --latency-requests >= --rounds, --max-texts >= {THROUGHPUT_BATCH}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
