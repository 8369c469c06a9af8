"""The evaluation stage of a finished run on the default runner against Dask (or Ray), side by side.

Usage (from the repository root, with the home of a finished ``domainflow run customer_service``)::

    DOMAINFLOW_HOME=~/.domainflow python benchmarks/task_runners.py customer_service
    DOMAINFLOW_HOME=... python benchmarks/task_runners.py customer_service --runner ray --rounds 2

The stage measured is what ``domainflow run`` submits after training: one ``evaluate`` task per candidate (test
and validation metrics, per-class report, confusion matrix, retrieval index), all submitted at once, for every
candidate model folder of the run (``<home>/runs/DOMAIN/models/*``) on the run's dataset. Each round runs the
stage once per runner with every evaluation recomputed (``refresh_cache``), in alternating order, in this one
process against one Prefect server, so the two see the same machine. Printed: seconds per round and runner, the
median, and the runner/default ratio.

* ``default`` — as ``domainflow run`` runs: Prefect's thread pool with one thread, the evaluations one after
  another, each using every core through torch's threads.
* ``dask`` / ``ray`` — a local cluster as ``domainflow run --task-runner dask|ray`` starts it (one worker
  process per core, one torch thread each, ``--workers`` to change), evaluations side by side.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import argument_parser  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()


def run_dataset(domain: str, fingerprint: str | None) -> Any:
    """The ingested dataset of the domain's run (the newest, or the one named), as the pipeline's record."""
    from domainflow import settings
    from domainflow.records import DatasetRef

    folders = sorted((settings.runs_dir() / domain / "datasets").glob("*"), key=lambda p: p.stat().st_mtime)
    if fingerprint:
        folders = [folder for folder in folders if folder.name == fingerprint]
    if not folders:
        raise SystemExit(f"no ingested dataset of {domain} under {settings.runs_dir()}: run the domain first")
    report = json.loads((folders[-1] / "ingest_report.json").read_text())
    return DatasetRef(
        domain=domain,
        path=str(folders[-1]),
        fingerprint=report["fingerprint"],
        test_fingerprint=report["test_fingerprint"],
        num_rows=report["num_rows"],
        label_names=report["label_names"],
    )


def run_candidates(domain: str) -> list[Any]:
    """Every candidate model folder of the domain's runs, as the records the pipeline hands to ``evaluate``."""
    from domainflow import settings
    from domainflow.fingerprint import path_fingerprint
    from domainflow.modeling import METADATA_FILE
    from domainflow.records import ModelRef

    candidates = []
    for folder in sorted((settings.runs_dir() / domain / "models").glob("*")):
        metadata_file = folder / METADATA_FILE
        if not metadata_file.is_file():
            continue
        metadata = json.loads(metadata_file.read_text())
        name = str(metadata.get("candidate", folder.name.rsplit("-", 1)[0]))
        candidates.append(
            ModelRef(
                name=name,
                path=str(folder),
                fingerprint=path_fingerprint(folder),
                parent=metadata.get("parent"),
                compression=metadata.get("compression"),
            )
        )
    if not candidates:
        raise SystemExit(f"no candidate models of {domain} under {settings.runs_dir()}")
    return candidates


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("domain", nargs="?", default="customer_service")
    parser.add_argument("--runner", choices=("dask", "ray"), default="dask", help="compared with the default runner")
    parser.add_argument("--workers", type=int, default=None, help="the cluster's worker processes (default: cores)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (default, RUNNER) in alternating order")
    parser.add_argument("--dataset", default=None, help="dataset fingerprint (default: the newest)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from prefect import flow

    from domainflow.catalog import get_domain
    from domainflow.spec import ClassificationSpec
    from flows.prefect_server import tether_ephemeral_server
    from flows.runners import start_runner
    from tasks.evaluate import evaluate

    spec = get_domain(args.domain).as_kind(ClassificationSpec)
    dataset = run_dataset(spec.name, args.dataset)
    candidates = run_candidates(spec.name)
    measured = spec.evaluation_slice()
    print(f"{spec.name}: {len(candidates)} candidates on {dataset.num_rows}: {', '.join(c.name for c in candidates)}")

    @flow(name="evaluation-stage", log_prints=True)
    def evaluation_stage() -> list[float]:
        runs = [evaluate.with_options(refresh_cache=True).submit(c, dataset, measured) for c in candidates]
        return [run.result().test_metrics[spec.primary_metric] for run in runs]

    tether_ephemeral_server()
    seconds: dict[str, list[float]] = {"default": [], args.runner: []}
    metrics: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        order = ["default", args.runner] if round_index % 2 == 0 else [args.runner, "default"]
        for kind in order:
            with start_runner(kind, workers=args.workers if kind != "default" else None) as plan:
                started = time.perf_counter()  # the cluster is up: its start-up is not the stage's time
                metrics[kind] = evaluation_stage.with_options(task_runner=plan.task_runner())()
                seconds[kind].append(time.perf_counter() - started)
                print(f"round {round_index + 1}, {plan.describe()}: {seconds[kind][-1]:.1f} s", flush=True)

    if metrics["default"] != metrics[args.runner]:
        print(f"WARNING: the runners measured different {spec.primary_metric}: {metrics}")
    base, other = statistics.median(seconds["default"]), statistics.median(seconds[args.runner])
    print()
    print(f"evaluation stage of {spec.name} ({len(candidates)} candidates), median of {args.rounds} round(s):")
    print(f"  default (1 thread): {base:.1f} s")
    print(f"  {args.runner}: {other:.1f} s   ({args.runner}/default x{other / base:.2f}, speed-up x{base / other:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"domain": spec.name, "seconds": seconds, "metrics": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
