"""Deploy stage of a ranking domain: the ranking gate, then promotion through the registry.

Promotion, lineage and the decision record are those of :func:`tasks.deploy.apply_decision`;
only the gate differs (:func:`domainflow.recsys.gate.decide_ranking`: the challenger must also
beat every baseline, outside the 95% paired bootstrap interval over users, computed from the
per-user test ranks each evaluation stored). Never cached, like ``deploy``: it changes registry state.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from domainflow.logs import run_logger
from domainflow.records import Evaluation
from domainflow.recsys.gate import decide_ranking
from domainflow.spec import DomainSpec
from tasks.artifacts import artifact_key
from tasks.caching import require_shared
from tasks.deploy import apply_decision, decision_outcome
from tasks.rank_evaluate import stored_test_ranks
from tasks.rank_report import _as_evaluations, markdown_table, model_rows


def decision_markdown(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The decision, outcome first, with every model's numbers and every verdict's reasons."""
    outcome = decision_outcome(result)
    champion = result.get("champion_metrics")
    primary = result["primary_metric"]
    lines = [
        f"# Gate decision: {result['domain']}",
        "",
        outcome,
        "",
        f"> {result['summary']}",
        "",
        f"- decided at {result['decided_at']}; "
        + (
            f"champion v{result['previous_champion']} test {primary} {champion[primary]:.4f}"
            if champion
            else "no champion before this run"
        ),
        f"- baselines (test {primary}): {result['gates'].get('baselines')}; rule: "
        f"{result['gates'].get('baseline_rule')}; champion tie tolerance {result['gates']['tie_tolerance']}; "
        f"compression budget {result['gates']['max_compression_drop']} / speed-up >= "
        f"{result['gates']['min_compression_speedup']}x",
        f"- test set {result.get('test_fingerprint')}; decision file `{result.get('decision_file')}`",
        "",
        markdown_table(rows),
        "",
        "## Reasons",
        "",
    ]
    lines += [f"- `{row['candidate']}` ({row['role']}): {row['reasons']}" for row in rows]
    return "\n".join(lines) + "\n"


@task(name="deploy-ranking", persist_result=False, cache_policy=NO_CACHE)  # registry state changes; never cache
def deploy_ranking(
    spec: DomainSpec,
    candidates: list[Evaluation],
    baselines: list[Evaluation],
    champion_metrics: dict | None,
    dataset_fingerprint: str,
    test_fingerprint: str,
    run_config: dict,
) -> dict:
    """Gate the candidates against the champion and the baselines; promote if they pass; show why."""
    require_shared(candidates, baselines)
    log = run_logger(__name__)
    domain = spec.name
    candidates, baselines = _as_evaluations(candidates), _as_evaluations(baselines)
    result = apply_decision(
        spec,
        candidates,
        champion_metrics,
        dataset_fingerprint,
        test_fingerprint,
        run_config,
        decide_fn=partial(decide_ranking, baselines=baselines, test_ranks=stored_test_ranks(baselines + candidates)),
    )
    rows = model_rows(baselines, candidates, result)
    result["rows"] = rows
    log.info("%s", result["summary"])
    try:
        create_markdown_artifact(
            markdown=decision_markdown(result, rows),
            key=artifact_key(domain, "gate-decision"),
            description=result["summary"],
        )
        create_table_artifact(
            table=rows, key=artifact_key(domain, "gate-candidates"), description=f"Models judged by the {domain} gate"
        )
    except Exception as exc:  # the decision is already on disk
        log.warning("could not publish the gate-decision artifacts for %s: %s", domain, exc)
    return result
