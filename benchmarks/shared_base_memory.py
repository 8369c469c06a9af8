"""Memory of `domainflow serve` with three adapter champions on one base encoder: shared base against merged copies.

Usage (from the repository root)::

    python benchmarks/shared_base_memory.py                         # 300-text slices, one epoch of LoRA each
    python benchmarks/shared_base_memory.py --max-train-samples 200 --json shared_base.json

Trains a LoRA candidate (customer_service's ``[peft]`` LoRA settings: rank 8 on every Linear of the encoder) for
each of three domains, customer_service, finance_sentiment and the test domain file pet_clinic, on the offline
6-layer MiniLM, with the pipeline's own code (ingestion of a stratified slice, linear probe, ``train_adapter``).
The training is brief on purpose: this measures memory and speed, not accuracy (the printed accuracies only show
that the adapters are real models). The three are promoted as champions in a temporary home, then
``domainflow serve`` runs as a real subprocess for the three domains twice: with shared bases (the default) and
with ``--merge-adapters`` (a full merged copy per domain). For each: once every domain is ready and has answered
a few requests, the server's RSS (and USS / PSS when psutil is there), then texts/s per domain for requests of 32
texts sent one after the other. Last, in this process (servers stopped): the bytes of distinct weight storage of
the three models loaded both ways, and each model's own speed at batch 32 (length-sorted passes, the model call
alone), shared-unmerged against merged, alternating rounds to even out a busy machine. A server with the first
domain alone gives the process's own cost, so that what each further domain adds shows both ways.

Reading the memory figures: transformers maps a safetensors file into memory copy-on-write, so the tensors a merge
does not write (MiniLM's embedding table, 45 of its 87 MB) are the same physical pages in every merged copy of
one base; RSS counts such a page once per mapping, USS and PSS once. The "tensor storage" line counts the distinct
tensors the models hold (what they would need without that mapping).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import argument_parser, ingest_and_probe  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()

DOMAINS = (
    "customer_service",
    "finance_sentiment",
    str(ROOT / "tests" / "domain_files" / "pet_clinic" / "pet_clinic.toml"),
)
KEY = "shared-base-benchmark-key-7d41"
BATCH = 32
MODES = {"shared": [], "merged": ["--merge-adapters"]}


def train_champions(work: Path, max_train_samples: int, epochs: float, seed: int) -> dict[str, dict[str, Any]]:
    """One LoRA candidate per domain on the default base, by spec name: its folder, test accuracy and test texts."""
    from datasets import load_from_disk

    from domainflow.catalog import get_domain
    from domainflow.modeling import load_classifier, predict_proba
    from domainflow.peft_models import adapter_methods
    from domainflow.spec import ClassificationSpec
    from tasks.peft_train import train_adapter

    methods = adapter_methods(get_domain("customer_service").as_kind(ClassificationSpec).peft)
    lora = next(m for m in methods if m.kind == "lora").model_copy(update={"epochs": epochs})
    champions: dict[str, dict[str, Any]] = {}
    for domain in DOMAINS:
        spec = get_domain(domain).as_kind(ClassificationSpec)
        folder = work / spec.name
        dataset, config, probe = ingest_and_probe(
            spec, None, folder, max_train_samples=max_train_samples, epochs=epochs, seed=seed
        )
        started = time.perf_counter()
        ref = train_adapter(dataset, Path(probe.path), config, lora, folder / "lora")
        test = load_from_disk(dataset.path)["test"].shuffle(seed=seed)
        test = test.select(range(min(len(test), 500)))  # enough to show the adapter learned something
        predicted = predict_proba(load_classifier(ref.path), list(test["text"])).argmax(dim=1)
        accuracy = float((predicted.numpy() == test["label"]).mean())
        print(f"{spec.name}: LoRA trained in {time.perf_counter() - started:.0f} s, test accuracy {accuracy:.3f}")
        champions[spec.name] = {
            "domain_arg": domain,
            "model_dir": Path(ref.path),
            "accuracy": accuracy,
            "texts": list(test["text"]),  # for the speed figures: test texts of the ingested split
        }
    return champions


def promote_all(home: Path, champions: dict[str, dict[str, Any]]) -> None:
    from domainflow.registry import ModelRegistry

    for name, champion in champions.items():
        ModelRegistry(name, root=home / "registry" / name).promote(
            champion["model_dir"],
            metrics={"test": {"accuracy": champion["accuracy"]}},
            lineage={"candidate": "lora"},
            decision={"summary": "benchmarks/shared_base_memory.py"},
        )


def start_service(home: Path, domains: list[str], names: list[str], extra: list[str]) -> tuple[subprocess.Popen, str]:
    """``domainflow serve`` for ``domains`` in its own process, returned once every domain is ready."""
    from benchmarks.serve_load import _free_port, wait_until_ready

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DOMAINFLOW_"))}
    env.update(DOMAINFLOW_HOME=str(home), DOMAINFLOW_API_KEYS=KEY)
    command = [sys.executable, "-m", "flows.ops_cli", "serve", *domains, "--port", str(port), *extra]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, url, names)
    return process, url


def stop_service(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def memory_mb(pid: int) -> dict[str, float | None]:
    """RSS, and USS / PSS when psutil is installed (what the process alone holds; its share of shared pages)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        from benchmarks.serve_load import rss_mb

        return {"rss": rss_mb(pid), "uss": None, "pss": None}
    info = psutil.Process(pid).memory_full_info()
    return {name: getattr(info, name, 0) / 2**20 or None for name in ("rss", "uss", "pss")}


def served_speed(url: str, name: str, texts: list[str], requests: int) -> float:
    """Texts/s of requests of BATCH texts sent one after the other (after two warm-up requests)."""
    import httpx

    bodies = [[texts[(i * BATCH + j) % len(texts)] for j in range(BATCH)] for i in range(requests + 2)]
    with httpx.Client(headers={"X-API-Key": KEY}, timeout=60) as client:
        for body in bodies[:2]:
            client.post(f"{url}/v1/{name}/predict", json={"texts": body}).raise_for_status()
        started = time.perf_counter()
        for body in bodies[2:]:
            client.post(f"{url}/v1/{name}/predict", json={"texts": body}).raise_for_status()
    return requests * BATCH / (time.perf_counter() - started)


def measure_service(
    home: Path, champions: dict[str, dict[str, Any]], texts: dict[str, list[str]], mode: str, args: Any
) -> dict[str, Any]:
    """Memory of ``domainflow serve`` for ``champions`` in ``mode`` once each domain has answered, and texts/s per
    domain (``args.requests`` requests of 32 texts)."""
    names = list(champions)
    extra = MODES[mode] + (["--torch-threads", str(args.threads)] if args.threads else [])
    process, url = start_service(home, [c["domain_arg"] for c in champions.values()], names, extra)
    try:
        speeds = {name: served_speed(url, name, texts[name], args.requests) for name in names}
        memory = memory_mb(process.pid)  # after every domain has answered: what a running service holds
    finally:
        stop_service(process)
    print(f"[{mode}, {len(names)} domains] memory MB {memory}; served texts/s {speeds}", flush=True)
    return {"memory_mb": memory, "served_texts_per_second": speeds}


def weight_bytes(models: list[Any]) -> int:
    """Bytes of the distinct tensor storages under ``models`` (a storage shared by several counts once)."""
    seen: dict[int, int] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_speeds(champions: dict[str, dict[str, Any]], texts: dict[str, list[str]], rounds: int) -> dict[str, Any]:
    """Distinct weight bytes of the three models both ways, and each model's texts/s at batch 32 both ways."""
    from domainflow.modeling import load_classifier, predict_proba

    loaded = {
        mode: {name: load_classifier(c["model_dir"], share_base=mode == "shared") for name, c in champions.items()}
        for mode in MODES
    }
    result: dict[str, Any] = {
        "weight_mb": {
            mode: weight_bytes([m.torch_model for m in models.values()]) / 2**20 for mode, models in loaded.items()
        },
        "texts_per_second": {},
    }
    for name in champions:
        speeds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for mode in MODES:
            predict_proba(loaded[mode][name], texts[name][:BATCH], batch_size=BATCH)  # warm-up
        for _ in range(rounds):
            for mode in MODES:  # alternating, so that a busy spell of the machine hits both
                started = time.perf_counter()
                predict_proba(loaded[mode][name], texts[name], batch_size=BATCH)
                speeds[mode].append(len(texts[name]) / (time.perf_counter() - started))
        result["texts_per_second"][name] = {mode: statistics.median(values) for mode, values in speeds.items()}
    return result


def print_report(services: dict[str, Any], models: dict[str, Any], champions: dict[str, Any]) -> None:
    shared, merged = services["shared"]["memory_mb"], services["merged"]["memory_mb"]
    one = services["one_domain"]["memory_mb"]
    print(
        f"\n{'memory of serve (MB)':<26} {'1 domain':>9} {'3 shared':>9} {'3 merged':>9} {'merged - shared':>16} "
        f"{'ratio':>6} {'each extra domain: shared / merged':>36}"
    )
    for kind in ("rss", "uss", "pss"):
        if shared.get(kind) and merged.get(kind) and one.get(kind):
            extra = f"{(shared[kind] - one[kind]) / 2:.0f} / {(merged[kind] - one[kind]) / 2:.0f}"
            print(
                f"{kind.upper():<26} {one[kind]:>9.0f} {shared[kind]:>9.0f} {merged[kind]:>9.0f} "
                f"{merged[kind] - shared[kind]:>16.0f} {merged[kind] / shared[kind]:>6.2f} {extra:>36}"
            )
    weights = models["weight_mb"]
    print(
        f"{'tensor storage, 3 models':<26} {'':>9} {weights['shared']:>9.1f} {weights['merged']:>9.1f} "
        f"{weights['merged'] - weights['shared']:>16.1f} {weights['merged'] / weights['shared']:>6.2f}"
    )
    header = f"{'texts/s, batch 32':<20} {'model: unmerged':>15} {'merged':>8} {'cost':>7} {'served: shared':>15}"
    print(f"\n{header} {'merged':>8}")
    for name in champions:
        own = models["texts_per_second"][name]
        served = {mode: services[mode]["served_texts_per_second"][name] for mode in MODES}
        cost = 1 - own["shared"] / own["merged"]
        print(
            f"{name:<20} {own['shared']:>15.0f} {own['merged']:>8.0f} {cost:>7.1%} "
            f"{served['shared']:>15.0f} {served['merged']:>8.0f}"
        )
    print(
        "\n(model: the model call alone in this process, length-sorted batches of 32; served: requests of 32 texts "
        "to `domainflow serve`, one after the other, HTTP and the service's passes of 8 included)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--max-train-samples", type=int, default=300, help="training slice per domain")
    parser.add_argument("--epochs", type=float, default=1.0, help="LoRA epochs (brief: memory, not accuracy)")
    parser.add_argument("--requests", type=int, default=8, help="timed requests of 32 texts per domain and mode")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the texts per model and mode")
    parser.add_argument("--texts", type=int, default=128, help="test texts per domain for the speed figures")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in serve (default: torch's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep models and home here (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="shared-base-bench-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        champions = train_champions(work / "train", args.max_train_samples, args.epochs, args.seed)
        promote_all(work / "home", champions)
        texts = {}
        for name, champion in champions.items():
            found = champion["texts"]
            texts[name] = [found[i % len(found)] for i in range(args.texts)]  # pet_clinic has 30: repeated
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        first = dict(list(champions.items())[:1])  # the process with one domain: what the other two add to it
        one = measure_service(work / "home", first, texts, "shared", args)  # the same traffic as the others get
        services = {mode: measure_service(work / "home", champions, texts, mode, args) for mode in MODES}
        services["one_domain"] = one
        models = model_speeds(champions, texts, args.rounds)
    print_report(services, models, champions)
    if args.json:
        accuracies = {name: c["accuracy"] for name, c in champions.items()}
        payload = {"services": services, "models": models, "accuracy": accuracies, "args": vars(args)}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
