"""Deploy: evaluated candidates + champion → gate decision → atomic promotion in the registry.

The split follows the rest of ``tasks/``: :func:`apply_decision` is a plain function (gates from
:mod:`domainflow.gates`, storage from :mod:`domainflow.registry`) that tests call without Prefect;
the :func:`deploy` task wraps it and adds what only makes sense inside a flow run: logs and the
Prefect artifacts that show the decision in the UI.

Every decision, pass or fail, is written to the registry with its numbers. The task is never
cached: it changes registry state, and a cached "promoted v3" replayed after a rollback would lie.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from domainflow import settings
from domainflow.footprint import training_columns
from domainflow.gates import GateDecision, decide
from domainflow.logs import run_logger
from domainflow.outofscope import DETECTOR_FILES
from domainflow.records import Evaluation
from domainflow.registry import ModelRegistry, RegistryError, VersionInfo
from domainflow.retrieval import INDEX_FILES
from domainflow.spec import DomainSpec
from domainflow.training_keys import FEDERATED_KEY, PRIVACY_KEY
from tasks.artifacts import artifact_key
from tasks.caching import require_shared
from tasks.evaluate import RETRIEVAL_DIR


def git_commit() -> str | None:
    """The project's commit for lineage, or None when git or a commit is unavailable."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=settings.PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def _as_evaluations(evaluations: Iterable[Evaluation | dict]) -> list[Evaluation]:
    """Accept records or their JSON form (a persisted upstream result comes back as dicts)."""
    return [e if isinstance(e, Evaluation) else Evaluation.model_validate(e) for e in evaluations]


def stored_metrics(evaluation: Evaluation) -> dict[str, Any]:
    """What the registry keeps in ``metrics.json`` for a promoted candidate."""
    return {
        "test": dict(evaluation.test_metrics),
        "validation": dict(evaluation.validation_metrics),
        "speed": {
            "texts_per_second_batch1": evaluation.texts_per_second_batch1,
            "texts_per_second_batch32": evaluation.texts_per_second_batch32,
            "latency_ms_p50": evaluation.latency_ms_p50,
            "latency_ms_p95": evaluation.latency_ms_p95,
        },
        "size": {
            "size_bytes": evaluation.size_bytes,
            "disk_bytes": evaluation.disk_bytes,
            "parameters": evaluation.parameters,
        },
        "training": dict(evaluation.training),  # trainable parameters, peak RSS, adapter bytes where recorded
    }


def champion_damage(registry: ModelRegistry, champion: VersionInfo | None) -> str | None:
    """Why the champion's files fail their manifest check (changed, missing), or None when they pass.

    Why the gate checks: a champion whose bytes changed after promotion is not the model its metrics
    describe, and a run that compared against it would keep a model nobody can load."""
    if champion is None:
        return None
    try:
        registry.get(champion.version, verify=True)
    except RegistryError as exc:
        return str(exc)
    return None


def champion_metrics_for(
    domain: str, test_fingerprint: str, *, registry: ModelRegistry | None = None
) -> dict[str, float] | None:
    """The champion's stored test metrics when they were measured on this very test set.

    ``None`` means either no champion, or a champion measured on a different test set: in the
    latter case the caller must re-evaluate the champion's model on the new test set, because
    comparing numbers from two test sets would make the gate meaningless.
    """
    registry = registry or ModelRegistry(domain)
    champion = registry.champion()
    if champion is None or champion.lineage.get("test_fingerprint") != test_fingerprint:
        return None
    test = champion.metrics.get("test")
    return dict(test) if isinstance(test, dict) else None


def apply_decision(
    spec: DomainSpec,
    evaluations: list[Evaluation],
    champion_metrics: dict[str, float] | None,
    dataset_fingerprint: str,
    test_fingerprint: str,
    run_config: dict,
    *,
    labels: list[str] | None = None,
    registry: ModelRegistry | None = None,
    decide_fn: Callable[..., GateDecision] = decide,
) -> dict[str, Any]:
    """Decide, record the decision, and promote when the gates say so. No Prefect needed.

    ``decide_fn`` is :func:`domainflow.gates.decide` or a gate built on it with the same
    signature (a ranking domain adds its baselines: :func:`domainflow.recsys.gate.decide_ranking`).

    ``champion_metrics=None`` while the registry has a champion is resolved from the registry
    when the champion was measured on the same test set (see :func:`champion_metrics_for`);
    otherwise it is an error rather than a silent "first model" promotion over a champion that
    was never compared.

    Returns the decision dict plus ``version`` (the new version, or None), ``champion_dir`` (the
    champion's model dir after this step, or None), ``previous_champion`` and ``decision_file``.
    """
    domain = spec.name
    registry = registry or ModelRegistry(domain)
    evaluations = _as_evaluations(evaluations)

    current = registry.champion()
    champion_version = current.version if current else None
    damage = champion_damage(registry, current)
    if damage is not None:
        # Its files no longer match what was promoted, so it cannot be served (the service refuses to load it):
        # the gate judges the challenger on the floors alone, as a first model; promoting is the repair.
        run_logger(__name__).error(
            "%s: champion v%s fails verification (%s): judging the challenger on the floors alone",
            domain,
            champion_version,
            damage,
        )
        champion_metrics = None
    elif champion_metrics is None and current is not None:
        champion_metrics = champion_metrics_for(domain, test_fingerprint, registry=registry)
        if champion_metrics is None:
            raise RegistryError(
                f"{domain}: champion v{current.version} was measured on test set "
                f"{current.lineage.get('test_fingerprint')!r}, not {test_fingerprint!r}; "
                "evaluate the champion on the new test set and pass its metrics"
            )

    decision = decide_fn(
        spec, evaluations, champion_metrics, champion_version=None if damage else champion_version
    ).to_dict()
    if damage is not None:
        decision["champion_damage"] = damage
        decision["summary"] = f"Champion v{champion_version} fails verification ({damage}). {decision['summary']}"
    decision["dataset_fingerprint"] = dataset_fingerprint
    decision["test_fingerprint"] = test_fingerprint
    decision_file = registry.record_decision(decision)

    version: int | None = None
    champion_dir = str(current.model_dir) if current else None
    if decision["promote"]:
        chosen = next(e for e in evaluations if e.candidate.name == decision["chosen"])
        card = Path(chosen.report_dir) / "model_card.md"
        lineage = {
            "domain": domain,
            "candidate": chosen.candidate.name,
            "model_fingerprint": chosen.candidate.fingerprint,
            "source_path": chosen.candidate.path,
            "parent": chosen.candidate.parent,
            # where the fp32 parent lives, so a compressed champion can be compared with it later
            # (benchmarks/inference.py)
            "parent_path": next(
                (e.candidate.path for e in evaluations if e.candidate.name == chosen.candidate.parent), None
            ),
            "compression": chosen.candidate.compression,
            "train_seconds": chosen.candidate.train_seconds,
            # the DP budget spent and the federation it came from, where the candidate has them: what an audit of a
            # privacy claim reads first (the model card repeats it for people)
            "privacy": chosen.training.get(PRIVACY_KEY),
            "federated": chosen.training.get(FEDERATED_KEY),
            "dataset_fingerprint": dataset_fingerprint,
            "test_fingerprint": test_fingerprint,
            "run_config": run_config,
            # the label ids the model answers with: a domain whose labels come from its data keeps them
            "labels": labels,
            "git_commit": git_commit(),
            "decision_file": str(decision_file.relative_to(registry.root)),
        }
        info = registry.promote(
            Path(chosen.candidate.path),
            metrics=stored_metrics(chosen),
            lineage=lineage,
            decision={**decision, "decision_file": lineage["decision_file"]},
            model_card=card if card.is_file() else None,
            model_extras=[
                Path(chosen.report_dir) / RETRIEVAL_DIR / name
                for name in (*INDEX_FILES, *DETECTOR_FILES)  # the known questions and the out-of-scope detector
                if (Path(chosen.report_dir) / RETRIEVAL_DIR / name).is_file()
            ],
            expected_champion=champion_version,
            expected_fingerprint=chosen.candidate.fingerprint,  # the folder must be what was evaluated
        )
        version = info.version
        champion_dir = str(info.model_dir)

    return {
        **decision,
        "version": version,
        "champion_dir": champion_dir,
        "previous_champion": champion_version,
        "decision_file": str(decision_file),
    }


# ---------------------------------------------------------------------------- presentation


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _num(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def candidate_rows(result: dict[str, Any], evaluations: list[Evaluation]) -> list[dict[str, Any]]:
    """One row per candidate: its numbers, whether it passed, and why (for the table artifact)."""
    verdicts = {v["name"]: v for v in result["verdicts"]}
    primary = result["primary_metric"]
    floors = sorted(result.get("gates", {}).get("min_metrics", {}))
    metrics = [primary, *(m for m in floors if m != primary)]
    rows = []
    for evaluation in _as_evaluations(evaluations):
        name = evaluation.candidate.name
        verdict = verdicts.get(name, {"eligible": False, "reasons": [], "role": "?"})
        row: dict[str, Any] = {
            "candidate": name,
            "role": verdict.get("role", ""),
            "compression": evaluation.candidate.compression or "",
            "parent": evaluation.candidate.parent or "",
        }
        for metric in metrics:
            row[f"test_{metric}"] = evaluation.test_metrics.get(metric)
        row[f"validation_{primary}"] = evaluation.validation_metrics.get(primary)
        row["texts_per_second_batch32"] = round(evaluation.texts_per_second_batch32 or 0.0, 1)
        row["latency_ms_p50"] = round(evaluation.latency_ms_p50 or 0.0, 2)
        row["size_mb"] = round(evaluation.size_bytes / 1e6, 1)
        row["disk_mb"] = round(evaluation.disk_bytes / 1e6, 1)
        row.update(training_columns(evaluation.training))
        row["eligible"] = bool(verdict["eligible"])
        row["chosen"] = name == result.get("chosen")
        row["reasons"] = "; ".join(verdict["reasons"])
        rows.append(row)
    return rows


def decision_outcome(result: dict[str, Any]) -> str:
    """The decision's first line in Markdown: what was promoted, or that the champion stays."""
    if result.get("version") is not None:
        return f"**Promoted `{result['chosen']}` as v{result['version']}.**"
    return "**No promotion.**" + (
        f" Champion stays v{result['previous_champion']}." if result.get("previous_champion") else ""
    )


def decision_markdown(result: dict[str, Any], evaluations: list[Evaluation]) -> str:
    """The gate decision as a Markdown report: outcome first, then every candidate with its reasons."""
    rows = candidate_rows(result, evaluations)
    reasons = {v["name"]: v["reasons"] for v in result["verdicts"]}
    primary = result["primary_metric"]
    outcome = decision_outcome(result)
    champion = result.get("champion_metrics")
    champion_line = (
        f"champion v{result.get('previous_champion')} test {primary}: {_num(champion.get(primary))}"
        if champion
        else "no champion before this run"
    )
    gates = result.get("gates", {})
    lines = [
        f"# Gate decision: {result['domain']}",
        "",
        outcome,
        "",
        f"> {result['summary']}",
        "",
        f"- decided at {result['decided_at']}; {champion_line}",
        f"- gates: floors {gates.get('min_metrics', {})}, tie tolerance {gates.get('tie_tolerance')}, "
        f"compression budget {gates.get('max_compression_drop')} / speed-up >= {gates.get('min_compression_speedup')}x",
        f"- test set {result.get('test_fingerprint')}, data {result.get('dataset_fingerprint')}",
        f"- champion model: `{result.get('champion_dir')}`",
        f"- decision file: `{result.get('decision_file')}`",
        "",
    ]
    if rows:
        metric_cols = [k for k in rows[0] if k.startswith("test_") or k.startswith("validation_")]
        header = [
            "candidate",
            "role",
            "compression",
            *metric_cols,
            "texts/s b32",
            "p50 ms",
            "size MB",
            "disk MB",
            "verdict",
            "reasons",
        ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            verdict = "chosen" if row["chosen"] else ("eligible" if row["eligible"] else "rejected")
            cells = [
                _cell(f"`{row['candidate']}`"),
                _cell(row["role"]),
                _cell(row["compression"] or "–"),
                *(_num(row[c]) for c in metric_cols),
                f"{row['texts_per_second_batch32']:.1f}",
                f"{row['latency_ms_p50']:.2f}",
                f"{row['size_mb']:.1f}",
                f"{row['disk_mb']:.1f}",
                verdict,
                "<br>".join(_cell(r) for r in reasons.get(row["candidate"], [])),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("_No candidates were evaluated._")
    return "\n".join(lines) + "\n"


def publish_artifacts(result: dict[str, Any], evaluations: list[Evaluation]) -> None:
    """Show the decision in the Prefect UI (needs a flow or task run context)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    domain = result["domain"]
    create_markdown_artifact(
        markdown=decision_markdown(result, evaluations),
        key=artifact_key(domain, "gate-decision"),
        description=result["summary"],
    )
    create_table_artifact(
        table=candidate_rows(result, evaluations),
        key=artifact_key(domain, "gate-candidates"),
        description=f"Candidates judged by the {domain} gates",
    )


@task(name="deploy", persist_result=False, cache_policy=NO_CACHE)  # registry state changes; never cache
def deploy(
    spec: DomainSpec,
    evaluations: list[Evaluation],
    champion_metrics: dict | None,
    dataset_fingerprint: str,
    test_fingerprint: str,
    run_config: dict,
    labels: list[str] | None = None,
) -> dict:
    """Gate the candidates against the champion, promote if they pass, and show why either way."""
    require_shared(evaluations)
    log = run_logger(__name__)
    domain = spec.name
    evaluations = _as_evaluations(evaluations)
    result = apply_decision(
        spec, evaluations, champion_metrics, dataset_fingerprint, test_fingerprint, run_config, labels=labels
    )
    log.info("%s", result["summary"])
    if result["version"] is not None:
        log.info("%s: promoted %s as v%s -> %s", domain, result["chosen"], result["version"], result["champion_dir"])
    try:
        publish_artifacts(result, evaluations)
    except Exception as exc:  # the decision is already on disk; a UI hiccup must not fail the run
        log.warning("could not publish the gate-decision artifacts for %s: %s", domain, exc)
    return result
