"""Fine-tuning in N torch DDP processes against one process: same data, recipe, seed and starting probe.

Usage (from the repository root)::

    python benchmarks/ddp_training.py                                  # customer_service, whole Banking77, 2 processes
    python benchmarks/ddp_training.py --max-train-samples 2000 --epochs 1   # a quicker look

Ingests the domain's data with the pipeline's own code, trains the linear probe once, then fine-tunes from it
twice with the pipeline's own training function (``tasks.finetune.finetune_classifier``): once in this process
(``processes=1``, as ``domainflow run`` trains by default) and once launched under ``torchrun`` with
``--processes`` ranks (gloo on CPUs, nccl where GPUs exist), the global batch unchanged. Printed: wall time of
each, their ratio, and test accuracy / macro-F1 of each with the difference. On a machine with few cores the
ranks share them (each gets cores / N threads), so no speed-up is expected there: the point of that measurement
is the cost, and the accuracy check.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import argument_parser, ingest_and_probe  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--domain", default="customer_service")
    parser.add_argument("--model", default=None, help="base encoder (default: the domain's, offline MiniLM)")
    parser.add_argument("--processes", type=int, default=2, help="DDP ranks of the distributed run")
    parser.add_argument("--epochs", type=float, default=None, help="default: the domain's")
    parser.add_argument("--max-train-samples", type=int, default=None, help="default: the whole training file")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the models here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from datasets import load_from_disk

    from domainflow.catalog import get_domain
    from domainflow.metrics import compute_metrics
    from domainflow.modeling import load_classifier, predict_proba
    from domainflow.records import ModelRef
    from domainflow.spec import ClassificationSpec
    from tasks.finetune import finetune_classifier

    spec = get_domain(args.domain).as_kind(ClassificationSpec)
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as scratch:
        work = args.work_dir or Path(scratch)
        dataset, config, probe = ingest_and_probe(
            spec, args.model, work, max_train_samples=args.max_train_samples, epochs=args.epochs, seed=args.seed
        )
        test = load_from_disk(dataset.path)["test"]

        def measure(processes: int) -> dict[str, float]:
            run_config = config.model_copy(update={"processes": processes})
            print(f"fine-tuning with {processes} process(es), {run_config.epochs} epochs …", flush=True)
            started = time.perf_counter()
            model: ModelRef = finetune_classifier(
                dataset, Path(probe.path), run_config, work / f"finetuned-{processes}"
            )
            seconds = time.perf_counter() - started
            predicted = predict_proba(load_classifier(model.path), list(test["text"])).argmax(dim=1).numpy()
            metrics = compute_metrics(["accuracy", "macro_f1"], predicted, test["label"])
            print(f"  {processes} process(es): {seconds:.1f} s, {metrics}", flush=True)
            return {"seconds": seconds, **metrics}

        results = {"single": measure(1), "ddp": measure(args.processes)}

    single, ddp = results["single"], results["ddp"]
    print()
    print(f"{'run':<22} {'wall s':>9} {'accuracy':>9} {'macro-F1':>9}")
    print(f"{'1 process':<22} {single['seconds']:>9.1f} {single['accuracy']:>9.4f} {single['macro_f1']:>9.4f}")
    label = f"{args.processes} DDP processes"
    print(f"{label:<22} {ddp['seconds']:>9.1f} {ddp['accuracy']:>9.4f} {ddp['macro_f1']:>9.4f}")
    print(
        f"DDP / 1 process: wall time x{ddp['seconds'] / single['seconds']:.2f}, "
        f"accuracy {100 * (ddp['accuracy'] - single['accuracy']):+.2f} points"
    )
    if args.json:
        args.json.write_text(json.dumps({"domain": spec.name, "processes": args.processes, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
