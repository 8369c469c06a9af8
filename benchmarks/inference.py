"""The deployed champion against Hugging Face's ``pipeline("text-classification")`` on the fp32 model.

Usage (from the repository root)::

    python benchmarks/inference.py                       # champion of customer_service under DOMAINFLOW_HOME
    python benchmarks/inference.py --threads 1 --max-texts 1000
    python benchmarks/inference.py --baseline-env both   # the pipeline at library defaults and under PASSIVE
    python benchmarks/inference.py --champion-dir DIR --fp32-dir DIR

Each side runs in a process of its own, started with that side's environment
(:mod:`benchmarks.inference_worker`: OpenMP reads its settings once, at start-up, so one process
cannot run torch under two), and loads its model once. The parent sends the same texts (the domain's
test split, a seeded sample when ``--max-texts`` is given) to every side and alternates timed rounds
between them, in an order that rotates, so that a noisy shared machine slows every side alike;
figures are medians over rounds, and the ratios are what to read.

* **baseline** — the fine-tuned fp32 model (the champion's parent) behind
  ``transformers.pipeline("text-classification")``, used as a user would: ``pipe(texts,
  batch_size=32, truncation=True)`` for throughput and ``pipe(text)`` per request for latency, at
  the libraries' defaults (``--baseline-env defaults``: no ``OMP_WAIT_POLICY``, thread or tokenizer
  variable reaches its process). ``--baseline-env project`` runs it under domainflow's settings
  instead, ``both`` measures both. The model is our mean-pooling classifier wrapped as a
  ``PreTrainedModel`` (:mod:`domainflow.hf_pipeline`); its predictions are checked against our own
  fp32 inference on every text, and the agreement is printed.
* **champion** — the registry's champion as serving loads it (``load_classifier`` +
  ``predict_proba``: length-sorted batches, one tokenizer call, int8 in ONNX Runtime or torch),
  by default under the environment ``domainflow serve`` runs it in (``--champion-env project``:
  ``OMP_WAIT_POLICY=PASSIVE``, ``TOKENIZERS_PARALLELISM=false``).

Printed: each side's environment as its process reports it (runtime variables, torch's and ONNX
Runtime's threads), texts/s at batch 32 and at batch 1, p50/p95 latency of one-text requests,
accuracy of both on the texts, and the champion/baseline ratios, against the goal (≥ 4× the
pipeline's batch-32 throughput at ≤ 1 point of accuracy lost). ``--threads`` sets the threads of
every side (torch and ONNX Runtime alike).

How far from the machine's limit: each side's GEMM work per text (:func:`benchmarks.gemm_peak.encoder_flops`:
per layer the Q/K/V/O projections, the feed-forward block and attention's two matmuls, at each
text's own token count, averaged over the texts) times its texts/s, as a share of the peak GEMM
throughput its process measures in its own runtime, threads and environment, in every round
(:func:`benchmarks.gemm_peak.measure_peak`: ONNX Runtime's int8 ``MatMulInteger`` for an
``onnx_int8`` champion, torch fp32 for the pipeline). ``--peak-seconds 0`` skips it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import labelled_test_texts  # noqa: E402
from benchmarks.gemm_peak import EncoderShape, mean_flops_per_text  # noqa: E402
from benchmarks.inference_worker import RUNTIME_VARIABLES, SETTINGS, SideProcess, WorkerError  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()  # offline hub and caches for this process and, through "project", for the sides

GOAL_SPEEDUP = 4.0
GOAL_MAX_DROP_POINTS = 1.0
THROUGHPUT_BATCH = 32
WARMUP_SINGLES = 4
BASELINE = "pipeline_fp32"
BASELINE_PROJECT = "pipeline_fp32_project"  # the second baseline of --baseline-env both
CHAMPION = "champion"
NO_CHAMPION_HELP = """no champion for {domain} under {home}.
Make one (about 30-60 minutes on 2 busy cores) and run this again:
    DOMAINFLOW_HOME={home} domainflow run {domain}
or point at model folders: --champion-dir DIR --fp32-dir DIR"""


class SideSummary(TypedDict):
    """One side's figures, as reported."""

    name: str
    model_dir: str
    setting: str
    environment: dict[str, Any]
    texts_per_second_batch32: float
    texts_per_second_batch1: float
    latency_ms_p50: float
    latency_ms_p95: float
    accuracy: float
    gemm_runtime: str
    mean_tokens: float
    gemm_ops_per_text: float
    gemm_peak: dict[str, Any] | None
    share_of_peak_batch32: float | None
    share_of_peak_batch1: float | None


@dataclass(frozen=True)
class SidePlan:
    """Which model a side runs, how (the pipeline or domainflow's own inference), and under which environment."""

    name: str
    kind: str  # "pipeline" or "champion", as benchmarks/inference_worker.py knows them
    model_dir: Path
    setting: str


@dataclass
class SideResult:
    """What one side measured: speed figures (medians over rounds), its batch-32 predictions, its peaks."""

    plan: SidePlan
    description: dict[str, Any]
    batch32_seconds: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list, repr=False)
    peaks: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self, texts: int, labels: Sequence[int]) -> SideSummary:
        ordered = sorted(self.latencies_s)
        per_second32 = texts / statistics.median(self.batch32_seconds)
        per_second1 = len(ordered) / sum(ordered)
        ops = mean_flops_per_text(EncoderShape(**self.description["encoder"]), self.description["token_counts"])
        peak = max(self.peaks, key=lambda p: p["gops"]) if self.peaks else None  # noise only lowers a peak
        return {
            "name": self.plan.name,
            "model_dir": str(self.plan.model_dir),
            "setting": self.plan.setting,
            "environment": self.description["environment"],
            "texts_per_second_batch32": per_second32,
            "texts_per_second_batch1": per_second1,
            "latency_ms_p50": 1000 * statistics.median(ordered),
            "latency_ms_p95": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "accuracy": sum(p == y for p, y in zip(self.predictions, labels, strict=True)) / len(labels),
            "gemm_runtime": self.description["runtime"],
            "mean_tokens": statistics.fmean(self.description["token_counts"]),
            "gemm_ops_per_text": ops,
            "gemm_peak": peak,
            "share_of_peak_batch32": per_second32 * ops / (1e9 * peak["gops"]) if peak else None,
            "share_of_peak_batch1": per_second1 * ops / (1e9 * peak["gops"]) if peak else None,
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
    return Path(champion_path).resolve(), Path(parent_path).resolve()


def side_plans(champion_dir: Path, fp32_dir: Path, baseline_env: str, champion_env: str) -> list[SidePlan]:
    """The sides to run: the baseline first (it also gives the reference predictions), then the champion."""
    first = "defaults" if baseline_env == "both" else baseline_env
    plans = [
        SidePlan(BASELINE, "pipeline", fp32_dir, first),
        SidePlan(CHAMPION, "champion", champion_dir, champion_env),
    ]
    if baseline_env == "both":
        plans.append(SidePlan(BASELINE_PROJECT, "pipeline", fp32_dir, "project"))
    return plans


@contextmanager
def started_sides(
    plans: Sequence[SidePlan], threads: int | None, texts: list[str]
) -> Iterator[tuple[dict[str, SideProcess], dict[str, dict[str, Any]]]]:
    """Start every side's process and load its model (all at once: loading is not timed); stop them all after.

    Yields the processes and what each said about itself when loaded, by side name."""
    with ExitStack() as stack:
        processes = {plan.name: stack.enter_context(SideProcess(plan.name, plan.setting)) for plan in plans}
        for plan in plans:
            processes[plan.name].send(
                "load", side=plan.kind, model_dir=str(plan.model_dir), threads=threads, texts=texts
            )
        yield processes, {plan.name: processes[plan.name].receive("load") for plan in plans}


def measure(
    processes: Mapping[str, SideProcess],
    results: dict[str, SideResult],
    texts: int,
    singles: int,
    rounds: int,
    peak_seconds: float,
) -> None:
    """Interleaved rounds: each side classifies all texts at batch 32, then its share of one-text requests,
    then (``peak_seconds`` > 0) measures its runtime's GEMM peak, while the other sides wait."""
    names = list(processes)
    per_round = [list(range(singles))[i::rounds] for i in range(rounds)]
    for name in names:
        processes[name].request("warmup", singles=WARMUP_SINGLES)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            process, result = processes[name], results[name]
            batch = process.request("batch")
            result.batch32_seconds.append(batch["seconds"])
            if not result.predictions:
                result.predictions = batch["predictions"]
            result.latencies_s.extend(process.request("singles", indices=per_round[round_index])["seconds"])
            line = f"  round {round_index + 1}/{rounds}: {name} {texts / batch['seconds']:.1f} texts/s at batch 32"
            if peak_seconds > 0:
                result.peaks.append(process.request("peak", seconds=peak_seconds))
                line += f"; GEMM peak {result.peaks[-1]['gops']:.0f} G ops/s"
            print(line, flush=True)


def run(args: argparse.Namespace) -> dict:
    champion_dir, fp32_dir = resolve_models(args.domain, args.champion_dir, args.fp32_dir)
    texts, labels = labelled_test_texts(args.domain, args.max_texts, args.seed)
    plans = side_plans(champion_dir, fp32_dir, args.baseline_env, args.champion_env)
    with started_sides(plans, args.threads, texts) as (processes, descriptions):
        results = {plan.name: SideResult(plan, descriptions[plan.name]) for plan in plans}
        print_sides(results)
        print(f"{len(texts)} texts, {args.latency_requests} one-text requests per side, {args.rounds} rounds")
        measure(processes, results, len(texts), args.latency_requests, args.rounds, args.peak_seconds)
        ours_fp32 = processes[BASELINE].request("reference")["predictions"]
    summaries = {name: result.summary(len(texts), labels) for name, result in results.items()}
    base, best = summaries[BASELINE], summaries[CHAMPION]
    report: dict[str, Any] = {
        "texts": len(texts),
        "threads": best["environment"]["torch_threads"],
        "rounds": args.rounds,
        "pipeline_agreement_with_our_fp32": _agreement(results[BASELINE].predictions, ours_fp32),
        "baseline": base,
        "champion": best,
        **ratios(base, best),
        "champion_agreement_with_fp32": _agreement(results[CHAMPION].predictions, ours_fp32),
    }
    if BASELINE_PROJECT in summaries:
        report["baseline_project"] = summaries[BASELINE_PROJECT]
        report["vs_baseline_project"] = ratios(summaries[BASELINE_PROJECT], best)
    report["goal_met"] = (
        report["speedup_batch32"] >= GOAL_SPEEDUP and report["accuracy_drop_points"] <= GOAL_MAX_DROP_POINTS
    )
    return report


def ratios(base: SideSummary, best: SideSummary) -> dict[str, float]:
    """The champion against one baseline: speed-ups, latency ratios and accuracy lost."""
    return {
        "speedup_batch32": best["texts_per_second_batch32"] / base["texts_per_second_batch32"],
        "speedup_batch1": best["texts_per_second_batch1"] / base["texts_per_second_batch1"],
        "latency_p50_ratio": base["latency_ms_p50"] / best["latency_ms_p50"],
        "latency_p95_ratio": base["latency_ms_p95"] / best["latency_ms_p95"],
        "accuracy_drop_points": 100 * (base["accuracy"] - best["accuracy"]),
    }


def _agreement(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def describe_environment(setting: str, environment: Mapping[str, Any]) -> str:
    """One line: the setting's name, the runtime variables that were set, and the thread counts."""
    wait = environment.get("OMP_WAIT_POLICY")
    parts = [f"OMP_WAIT_POLICY={wait}" if wait is not None else "OMP_WAIT_POLICY unset (library default)"]
    others = [f"{v}={environment[v]}" for v in RUNTIME_VARIABLES if v != "OMP_WAIT_POLICY" and environment.get(v)]
    parts.append(", ".join(others) if others else "no other thread variable set")
    parts.append(f"torch {environment['torch_threads']} threads ({environment['torch_interop_threads']} inter-op)")
    if "onnxruntime_intra_op_threads" in environment:
        spinning = "on" if environment["onnxruntime_spinning"] else "off"
        parts.append(
            f"ONNX Runtime {environment['onnxruntime_intra_op_threads']} intra-op threads, spinning {spinning}"
        )
    return f"{setting}: " + "; ".join(parts)


def print_sides(results: Mapping[str, SideResult]) -> None:
    for name, result in results.items():
        what = result.description
        how = (
            "behind transformers.pipeline('text-classification')"
            if result.plan.kind == "pipeline"
            else f"as serving loads it ({what['compression'] or 'fp32'})"
        )
        print(f"{name}: {result.plan.model_dir} ({what['candidate']}) {how}")
        print(f"  environment {describe_environment(result.plan.setting, what['environment'])}")


def print_report(report: dict) -> None:
    sides: list[tuple[str, dict[str, Any]]] = [("pipeline fp32", report["baseline"])]
    if "baseline_project" in report:
        sides.append(("pipeline, project", report["baseline_project"]))
    sides.append(("champion", report["champion"]))
    rows = [
        ("texts/s, batch 32", "texts_per_second_batch32", "{:.1f}"),
        ("texts/s, batch 1", "texts_per_second_batch1", "{:.1f}"),
        ("latency p50 (ms), batch 1", "latency_ms_p50", "{:.2f}"),
        ("latency p95 (ms), batch 1", "latency_ms_p95", "{:.2f}"),
        ("accuracy", "accuracy", "{:.4f}"),
    ]
    print()
    print(f"{'':28s}" + "".join(f" {label:>18s}" for label, _ in sides))
    print(f"{'environment':28s}" + "".join(f" {side['setting']:>18s}" for _, side in sides))
    for label, key, fmt in rows:
        print(f"{label:28s}" + "".join(f" {fmt.format(side[key]):>18s}" for _, side in sides))
    print()
    base, best = report["baseline"], report["champion"]
    print(
        f"pipeline agrees with our fp32 inference on {100 * report['pipeline_agreement_with_our_fp32']:.2f}% of texts; "
        f"champion agrees with fp32 on {100 * report['champion_agreement_with_fp32']:.2f}%"
    )
    print_ratios(report, f"pipeline at {base['setting']}")
    if "vs_baseline_project" in report:
        print_ratios(report["vs_baseline_project"], "pipeline at project")
    print(
        f"accuracy: {100 * base['accuracy']:.2f}% -> {100 * best['accuracy']:.2f}% "
        f"({100 * (best['accuracy'] - base['accuracy']):+.2f} points)"
    )
    verdict = "met" if report["goal_met"] else "NOT met"
    print(
        f"goal (>= {GOAL_SPEEDUP:.0f}x batch-32 throughput against the pipeline at {base['setting']}, "
        f"<= {GOAL_MAX_DROP_POINTS:.0f} point lost): {verdict}"
    )
    print()
    print("how far from the machine's limit (GEMM work per text: Q/K/V/O, feed-forward, attention's two matmuls):")
    for label, side in sides:
        print_limit(label, side)


def print_ratios(ratios_: Mapping[str, float], against: str) -> None:
    print(
        f"champion / {against}: throughput {ratios_['speedup_batch32']:.2f}x at batch 32, "
        f"{ratios_['speedup_batch1']:.2f}x at batch 1; latency p50 {ratios_['latency_p50_ratio']:.2f}x, "
        f"p95 {ratios_['latency_p95_ratio']:.2f}x"
    )


def print_limit(label: str, side: Mapping[str, Any]) -> None:
    ops = side["gemm_ops_per_text"]
    print(f"  {label}: {ops / 1e6:.1f} M ops per text (mean {side['mean_tokens']:.1f} tokens)")
    peak = side["gemm_peak"]
    if peak is None:
        print("    no GEMM peak measured (--peak-seconds 0)")
        return
    allowed = 1e9 * peak["gops"] / ops
    print(
        f"    {side['gemm_runtime']} peak {peak['gops']:.1f} G ops/s at {peak['threads']} threads "
        f"(best of rounds, shape {' x '.join(map(str, peak['best_shape']))}) allows {allowed:,.0f} texts/s"
    )
    for batch in ("32", "1"):
        per_second, share = side[f"texts_per_second_batch{batch}"], side[f"share_of_peak_batch{batch}"]
        print(
            f"    batch {batch:>2s}: {per_second:.1f} texts/s = {per_second * ops / 1e9:.1f} G ops/s = "
            f"{100 * share:.1f}% of that peak"
        )


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
        "--threads", type=int, default=None, help="threads for every side (default: torch's default, one per core)"
    )
    parser.add_argument(
        "--baseline-env",
        choices=[*SETTINGS, "both"],
        default="defaults",
        help="the pipeline's environment: library defaults (as its users run it), domainflow's settings, or both",
    )
    parser.add_argument(
        "--champion-env",
        choices=SETTINGS,
        default="project",
        help="the champion's environment (default: domainflow's settings, as `domainflow serve` runs it)",
    )
    parser.add_argument(
        "--peak-seconds",
        type=float,
        default=0.1,
        help="time per GEMM shape of each round's peak measurement (0: no peak, no share of it)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-texts sample")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if (
        args.rounds < 1
        or args.latency_requests < args.rounds
        or (args.max_texts is not None and args.max_texts < THROUGHPUT_BATCH)
        or (args.threads is not None and args.threads < 1)
        or args.peak_seconds < 0
    ):
        parser.error(
            f"need --rounds >= 1, --latency-requests >= --rounds, --max-texts >= {THROUGHPUT_BATCH}, "
            "--threads >= 1 and --peak-seconds >= 0"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
