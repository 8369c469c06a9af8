"""Which out-of-scope score should be the default, and does the champion meet the goal?

Usage (from the repository root)::

    python benchmarks/out_of_scope.py --model-dir DIR --dataset-dir DIR [--domain customer_service]

``--model-dir`` is a model folder (fp32 safetensors or an ONNX graph, e.g. a registry version's
``model/``), ``--dataset-dir`` the ingested dataset it was trained on (train, validation and test
splits). The out-of-scope texts are the domain's ``out_of_scope.eval_files`` (``--eval-file`` to
use others), a seeded sample of at most ``eval_sample`` per file.

For every score kind (``domainflow.outofscope``) the pipeline's own code fits the class
statistics on the training texts and calibrates the threshold on the validation split for
``--max-cost`` (default: the domain's ``max_in_scope_cost``); printed per kind, on test: the
threshold, out-of-scope recall (overall and per source), the in-scope false-alarm rate, the
in-scope accuracy without and with the flagging (the cost) and the AUROC of in-scope test
texts against out-of-scope ones. The model is run once per text set; every kind reads the same
outputs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import argument_parser  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--model-dir", required=True, type=Path, help="the model folder to measure")
    parser.add_argument("--dataset-dir", required=True, type=Path, help="its ingested dataset (save_to_disk folder)")
    parser.add_argument("--domain", default="customer_service", help="the domain (a name or a domain file)")
    parser.add_argument("--eval-file", action="append", type=Path, help="out-of-scope texts (repeatable)")
    parser.add_argument("--max-cost", type=float, help="in-scope accuracy the flagging may cost on validation")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    from datasets import load_from_disk

    from domainflow.catalog import get_domain
    from domainflow.modeling import load_classifier
    from domainflow.outofscope import (
        SCORE_KINDS,
        ClassStatistics,
        OutOfScopeDetector,
        eval_texts,
        in_scope_columns,
        measure_detector,
        model_outputs,
    )
    from domainflow.spec import ClassificationSpec, OutOfScopeDetection

    spec = get_domain(args.domain).as_kind(ClassificationSpec)
    detection = spec.evaluation_slice().out_of_scope or OutOfScopeDetection()
    files = [str(path) for path in args.eval_file] if args.eval_file else list(detection.eval_files)
    if not files:
        raise SystemExit(f"{spec.name} names no out_of_scope.eval_files: give --eval-file")
    max_cost = args.max_cost if args.max_cost is not None else detection.max_in_scope_cost
    if not args.model_dir.is_dir() or not (args.dataset_dir / "dataset_dict.json").is_file():
        raise SystemExit(
            f"need a model folder and an ingested dataset folder; got {args.model_dir}, {args.dataset_dir}"
        )

    started = time.perf_counter()
    loaded = load_classifier(args.model_dir)
    splits = load_from_disk(str(args.dataset_dir))
    names = loaded.label_names
    label_index = names.index(detection.label) if detection.label in names else None
    outputs = {
        split: model_outputs(loaded, list(splits[split]["text"]), with_embeddings=True)
        for split in ("train", "validation", "test")
    }
    others = {
        name: model_outputs(loaded, texts, with_embeddings=True)
        for name, texts in eval_texts(files, detection.eval_sample).items()
    }
    statistics = ClassStatistics.fit(
        outputs["train"].unit_embeddings(), list(splits["train"]["label"]), in_scope_columns(len(names), label_index)
    )
    print(
        f"model {args.model_dir} ({loaded.metadata.get('compression') or 'fp32'}); validation "
        f"{len(splits['validation'])}, test {len(splits['test'])}, out of scope "
        + ", ".join(f"{name} {len(o.logits)}" for name, o in others.items())
        + f"; calibrated for at most {max_cost:.1%} in-scope cost on validation ({time.perf_counter() - started:.0f} s)"
    )

    results = {}
    for kind in SCORE_KINDS:
        detector = OutOfScopeDetector.calibrated(
            kind,
            outputs["validation"],
            list(splits["validation"]["label"]),
            max_cost,
            statistics=statistics,
            label_index=label_index,
        )
        figures = measure_detector(detector, outputs["test"], list(splits["test"]["label"]), others)
        results[kind] = {**figures, **{k: v for k, v in detector.calibration.items() if k.startswith("validation_")}}

    sources = [f"out_of_scope_recall/{name}" for name in others]
    header = ["score", "threshold", "OOS recall", *(s.split("/")[-1] for s in sources), "false alarm"]
    header += ["acc", "acc flagged", "cost", "val cost", "AUROC"]
    print(" | ".join(header))
    for kind, f in results.items():
        row = [kind, f"{f['threshold']:.4g}", f"{f['out_of_scope_recall']:.2%}", *(f"{f[s]:.2%}" for s in sources)]
        row += [f"{f['false_alarm_rate']:.2%}", f"{f['in_scope_accuracy']:.2%}"]
        row += [f"{f['in_scope_accuracy_with_flagging']:.2%}", f"{f['in_scope_cost']:.2%}"]
        row += [f"{f['validation_in_scope_cost']:.2%}", f"{f['auroc']:.4f}"]
        print(" | ".join(row))
    ranked = sorted(results, key=lambda k: results[k]["out_of_scope_recall"], reverse=True)
    best, second = ranked[0], ranked[1]
    print(
        f"best: {best} (recall {results[best]['out_of_scope_recall']:.2%}), "
        f"{100 * (results[best]['out_of_scope_recall'] - results[second]['out_of_scope_recall']):.1f} points over "
        f"{second}; domain default: {detection.score}"
    )
    goal = results[detection.score]
    met = goal["out_of_scope_recall"] >= 0.8 and goal["in_scope_cost"] <= 0.01
    print(
        f"goal (recall >= 80% at <= 1 point in-scope cost on test) with {detection.score}: "
        f"{'met' if met else 'NOT met'} (recall {goal['out_of_scope_recall']:.2%}, cost {goal['in_scope_cost']:.2%})"
    )
    if args.json:
        args.json.write_text(json.dumps({"model_dir": str(args.model_dir), "max_cost": max_cost, "scores": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
