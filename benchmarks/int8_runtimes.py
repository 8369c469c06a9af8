"""Which int8 recipe should be the default: torch dynamic int8 or ONNX Runtime int8?

Usage (from the repository root)::

    python benchmarks/int8_runtimes.py --fp32-dir DIR               # e.g. the run's fine-tuned model
    python benchmarks/int8_runtimes.py --fp32-dir DIR --threads 1

Builds both int8 candidates of the fp32 model with the pipeline's own code
(``tasks.compress.quantize_model``) in a scratch folder, then measures the three models with
the pipeline's own speed code (``tasks.speed.measure_side_by_side``: one process, interleaved
rounds, same texts) and their accuracy on the domain's whole test split. Printed: texts/s at
batch 32 and 1, p50/p95 latency at batch 1, accuracy, agreement with fp32, and each int8
recipe's ratios against fp32 and against the other recipe. ``--threads`` sets torch's threads
and, through them, ONNX Runtime's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import argument_parser, labelled_test_texts  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--fp32-dir", required=True, help="an fp32 domainflow model folder (safetensors)")
    parser.add_argument("--domain", default="customer_service", help="domain whose test split is used")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: one per core)"
    )
    parser.add_argument(
        "--speed-texts", type=int, default=512, help="texts timed at batch 32 each round (the pipeline uses 512)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from domainflow.modeling import load_classifier, predict_proba
    from domainflow.records import ModelRef
    from tasks.compress import quantize_model
    from tasks.speed import LATENCY_REQUESTS, measure_side_by_side, speed_texts

    texts, labels = labelled_test_texts(args.domain, None, 0)
    parent = ModelRef(name="fp32", path=str(Path(args.fp32_dir).resolve()), fingerprint="benchmark")
    with tempfile.TemporaryDirectory(prefix="int8-runtimes-") as scratch:
        dirs = {"fp32": parent.path}
        for recipe in ("dynamic_int8", "onnx_int8"):
            started = time.perf_counter()
            dirs[recipe] = quantize_model(parent, Path(scratch) / recipe, recipe).path
            print(f"built {recipe} in {time.perf_counter() - started:.1f} s")
        sample = speed_texts(texts, max(LATENCY_REQUESTS, args.speed_texts))
        print(
            f"measuring {list(dirs)} on {len(sample)} texts, {args.rounds} rounds, {torch.get_num_threads()} threads "
            "...",
            flush=True,
        )
        speeds = measure_side_by_side(dirs, sample, rounds=args.rounds)
        predictions = {
            name: predict_proba(load_classifier(path), texts, batch_size=32).argmax(dim=1)
            for name, path in dirs.items()
        }
    truth = torch.tensor(labels)
    results = {
        name: {
            **speeds[name],
            "accuracy": float((predictions[name] == truth).float().mean()),
            "agreement_with_fp32": float((predictions[name] == predictions["fp32"]).float().mean()),
        }
        for name in dirs
    }
    print(
        f"\n{'':14s} {'b32 texts/s':>12s} {'b1 texts/s':>11s} {'p50 ms':>8s} {'p95 ms':>8s} {'accuracy':>9s} "
        f"{'= fp32':>7s}"
    )
    for name, r in results.items():
        print(
            f"{name:14s} {r['texts_per_second_batch32']:12.1f} {r['texts_per_second_batch1']:11.1f} "
            f"{r['latency_ms_p50']:8.2f} {r['latency_ms_p95']:8.2f} {r['accuracy']:9.4f} "
            f"{r['agreement_with_fp32']:7.3f}"
        )
    ratios = {}
    for name in ("dynamic_int8", "onnx_int8"):
        for key in ("texts_per_second_batch32", "texts_per_second_batch1"):
            ratios[f"{name}/fp32 {key}"] = results[name][key] / results["fp32"][key]
    for key in ("texts_per_second_batch32", "texts_per_second_batch1"):
        ratios[f"onnx_int8/dynamic_int8 {key}"] = results["onnx_int8"][key] / results["dynamic_int8"][key]
    print()
    for label, value in ratios.items():
        print(f"{label}: {value:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"threads": torch.get_num_threads(), "results": results, "ratios": ratios}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
