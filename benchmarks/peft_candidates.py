"""Parameter-efficient candidates (LoRA, IA3) against the full fine-tune: same data slice, probe, recipe and seed.

Usage (from the repository root)::

    python benchmarks/peft_candidates.py --max-train-samples 2000           # customer_service, a 2,000-text slice
    python benchmarks/peft_candidates.py --methods lora --peft lora_rank=16 --peft lora_lr=2e-3
    python benchmarks/peft_candidates.py --no-finetune --epochs 1            # only the adapters, one epoch

Ingests the domain's data with the pipeline's own code (a stratified slice of the training file with
``--max-train-samples``; the whole test file), trains the linear probe once, then trains each candidate from it
with the pipeline's own functions (``tasks.peft_train.train_adapter``, ``tasks.finetune.finetune_classifier``),
each in a fresh process of its own so that its peak resident memory is its own. Printed per candidate: test
accuracy and macro-F1, trainable parameters, training wall time, peak RSS while training (sampled, see
``domainflow.footprint``), the bytes it adds on disk (adapter + head; the whole folder for the full fine-tune)
and its best validation accuracy. ``--peft KEY=VALUE`` overrides a key of the domain's ``[peft]`` table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import argument_parser, ingest_and_probe  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()

FINETUNED = "finetuned"
RESULT_PREFIX = "RESULT "


def peft_settings(domain: str, overrides: list[str], methods: list[str] | None) -> Any:
    """The domain's ``[peft]`` table with ``KEY=VALUE`` overrides (values read as JSON when they parse)."""
    from domainflow.catalog import get_domain
    from domainflow.spec import ClassificationSpec

    settings = get_domain(domain).as_kind(ClassificationSpec).peft
    changes: dict[str, Any] = {}
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--peft wants KEY=VALUE, got {item!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    if methods is not None:
        changes["methods"] = methods
    return settings.replace(**changes)


def score_on_test(dataset: Any, model_dir: str) -> dict[str, float]:
    """Accuracy and macro-F1 of a model folder on the dataset's test split."""
    from datasets import load_from_disk

    from domainflow.metrics import compute_metrics
    from domainflow.modeling import load_classifier, predict_proba

    test = load_from_disk(dataset.path)["test"]
    predicted = predict_proba(load_classifier(model_dir), list(test["text"])).argmax(dim=1).numpy()
    return compute_metrics(["accuracy", "macro_f1"], predicted, test["label"])


def probe_row(dataset: Any, probe: Any) -> dict[str, Any]:
    """The linear probe every candidate starts from, for reference (trained in this process: no peak RSS)."""
    from domainflow.modeling import directory_size, load_classifier

    head = load_classifier(probe.path).torch_model.classifier
    return {
        "candidate": probe.name,
        **score_on_test(dataset, probe.path),
        "best_validation_accuracy": None,
        "trainable_parameters": sum(p.numel() for p in head.parameters()),
        "train_seconds": probe.train_seconds,
        "peak_rss_mb": None,
        "added_bytes": directory_size(probe.path),
    }


def train_one(job_file: Path) -> dict[str, Any]:
    """In a child process: train one candidate from the probe and measure it on the test split."""
    from domainflow.footprint import training_figures
    from domainflow.modeling import directory_size, read_metadata
    from domainflow.peft_models import AdapterMethod
    from domainflow.records import DatasetRef
    from tasks.finetune import TrainConfig, finetune_classifier
    from tasks.peft_train import train_adapter

    job = json.loads(job_file.read_text())
    dataset = DatasetRef.model_validate(job["dataset"])
    config = TrainConfig.model_validate(job["config"])
    probe, out = Path(job["probe"]), Path(job["out"])
    if job["method"] is None:
        ref = finetune_classifier(dataset, probe, config, out)
    else:
        ref = train_adapter(dataset, probe, config, AdapterMethod.model_validate(job["method"]), out)
    metadata = read_metadata(ref.path)
    figures = training_figures(metadata)
    return {
        "candidate": ref.name,
        **score_on_test(dataset, ref.path),
        "best_validation_accuracy": metadata.get(f"best_validation_{config.primary_metric}"),
        "trainable_parameters": figures.get("trainable_parameters"),
        "train_seconds": ref.train_seconds,
        "peak_rss_mb": figures.get("peak_rss_mb"),
        "added_bytes": figures.get("adapter_bytes", directory_size(ref.path)),
    }


def run_child(job: dict[str, Any], work: Path) -> dict[str, Any]:
    name = job["name"]
    job_file = work / f"job-{name}.json"
    job_file.write_text(json.dumps(job))
    print(f"training {name} …", flush=True)
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(job_file)], stdout=subprocess.PIPE, text=True, check=False
    )
    lines = []
    for line in done.stdout.splitlines():  # the Trainer's progress (per-epoch validation) shown, the result kept
        if line.startswith(RESULT_PREFIX):
            lines.append(line)
        else:
            print(line)
    if done.returncode != 0 or not lines:
        raise SystemExit(f"training {name} failed (exit {done.returncode}); its output is above")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    print(f"  {name}: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--domain", default="customer_service")
    parser.add_argument("--model", default=None, help="base encoder (default: the domain's, offline MiniLM)")
    parser.add_argument("--methods", nargs="+", choices=["lora", "ia3"], help="default: the domain's [peft] methods")
    parser.add_argument("--peft", action="append", default=[], metavar="KEY=VALUE", help="override a [peft] key")
    parser.add_argument("--no-finetune", action="store_true", help="skip the full fine-tune baseline")
    parser.add_argument("--epochs", type=float, default=None, help="default: the domain's (both kinds)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="default: the whole training file")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the models here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one candidate's training, in a child
    args = parser.parse_args(argv)
    if args.child is not None:
        print(RESULT_PREFIX + json.dumps(train_one(args.child)), flush=True)
        return 0

    from domainflow.catalog import get_domain
    from domainflow.peft_models import adapter_methods, require_peft
    from domainflow.spec import ClassificationSpec

    spec = get_domain(args.domain).as_kind(ClassificationSpec)
    settings = peft_settings(args.domain, args.peft, args.methods)
    if args.epochs is not None:
        settings = settings.replace(epochs=args.epochs)
    methods = adapter_methods(settings)
    if methods:
        require_peft()
    with tempfile.TemporaryDirectory(prefix="peft-bench-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        dataset, config, probe = ingest_and_probe(
            spec, args.model, work, max_train_samples=args.max_train_samples, epochs=args.epochs, seed=args.seed
        )
        common: dict[str, Any] = {"dataset": dataset.model_dump(mode="json"), "config": config.model_dump(mode="json")}
        jobs: list[dict[str, Any]] = [] if args.no_finetune else [{"name": FINETUNED, "method": None}]
        jobs += [{"name": method.kind, "method": method.model_dump(mode="json")} for method in methods]
        results = [probe_row(dataset, probe)]
        for job in jobs:
            results.append(run_child({**common, **job, "probe": probe.path, "out": str(work / str(job["name"]))}, work))

    print()
    header = (
        f"{'candidate':<11} {'accuracy':>9} {'macro-F1':>9} {'val acc':>8} {'trainable':>11} {'train s':>8} "
        f"{'peak RSS MB':>12} {'adds on disk':>13}"
    )
    print(header)
    for row in results:
        print(
            f"{row['candidate']:<11} {row['accuracy']:>9.4f} {row['macro_f1']:>9.4f} "
            f"{row['best_validation_accuracy'] or float('nan'):>8.4f} {row['trainable_parameters']:>11,} "
            f"{row['train_seconds']:>8.1f} {row['peak_rss_mb'] or float('nan'):>12.0f} "
            f"{row['added_bytes'] / 1e6:>10.2f} MB"
        )
    print(
        f"slice: {dataset.num_rows}, seed {args.seed}; epochs: fine-tune {config.epochs}, "
        f"adapters {settings.epochs or config.epochs} (early stopping on validation)"
    )
    if args.json:
        payload = {"domain": spec.name, "rows": dataset.num_rows, "peft": settings.model_dump(), "results": results}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
