"""Reports of a ranking run: one table of every model, the model cards, and their Prefect artifacts.

The table puts the baselines and the candidates side by side with the same columns, because the
question a reader asks is "did the text model and the ranker beat the baselines (popularity, BPR,
BPR with the history folded in, item-kNN), by more than noise, on what, at what cost". Each
candidate's model card states the protocol, so a number is never read without the situation it
measures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from domainflow.logs import run_logger
from domainflow.records import Evaluation
from domainflow.recsys.bootstrap import paired_difference
from domainflow.recsys.dataset import RankingData
from domainflow.recsys.protocol import cold_target_rows
from domainflow.recsys.records import BaselinesRef, RankingDatasetRef
from domainflow.recsys.spec import RankingSpec
from tasks.artifacts import artifact_key
from tasks.caching import require_shared
from tasks.rank_evaluate import COLD_PREFIX, stored_test_ranks

METRIC_COLUMNS = ("test_hit_rate_at_10", "test_ndcg_at_10", "test_mrr", "validation_ndcg_at_10")
COLUMNS = (
    "candidate",
    "role",
    *METRIC_COLUMNS,
    "histories_per_second_batch32",
    "latency_ms_p50",
    "size_mb",
    "train_seconds",
)


def _as_evaluations(items: Iterable[Evaluation | dict]) -> list[Evaluation]:
    return [e if isinstance(e, Evaluation) else Evaluation.model_validate(e) for e in items]


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def model_rows(
    baselines: list[Evaluation], candidates: list[Evaluation], decision: dict | None = None
) -> list[dict[str, Any]]:
    """One row per model, baselines first; with a decision, each row also carries its verdict."""
    verdicts = {v["name"]: v for v in (decision or {}).get("verdicts", [])}
    rows = []
    for role, evaluations in (("baseline", baselines), ("candidate", candidates)):
        for evaluation in evaluations:
            name = evaluation.candidate.name
            row: dict[str, Any] = {
                "candidate": name,
                "role": verdicts.get(name, {}).get("role", role),
                "test_hit_rate_at_10": evaluation.test_metrics.get("hit_rate_at_10"),
                "test_ndcg_at_10": evaluation.test_metrics.get("ndcg_at_10"),
                "test_mrr": evaluation.test_metrics.get("mrr"),
                "validation_ndcg_at_10": evaluation.validation_metrics.get("ndcg_at_10"),
                "histories_per_second_batch32": _round(evaluation.texts_per_second_batch32, 1),
                "latency_ms_p50": _round(evaluation.latency_ms_p50, 1),
                "size_mb": round(evaluation.size_bytes / 1e6, 2),
                "train_seconds": round(evaluation.candidate.train_seconds, 1),
            }
            if decision is not None:
                verdict = verdicts.get(name, {})
                row["eligible"] = bool(verdict.get("eligible", False))
                row["chosen"] = name == decision.get("chosen")
                row["reasons"] = "; ".join(verdict.get("reasons", []))
            rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(column: str, value: Any) -> str:
        if value is None:
            return "–"
        if column in METRIC_COLUMNS:
            return f"{value:.4f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def baseline_comparisons(
    spec: Any, evaluation: Evaluation, baselines: list[Evaluation], ranks: dict[str, list[int]]
) -> list[str]:
    """One line per baseline: this model's test primary metric minus the baseline's, with its 95% paired
    bootstrap interval over users and the verdict the gate would give (win / tie / loss)."""
    primary = spec.primary_metric
    mine = ranks[evaluation.candidate.name]
    lines = []
    for baseline in baselines:
        interval = paired_difference(mine, ranks[baseline.candidate.name], primary)
        lines.append(
            f"- vs `{baseline.candidate.name}` ({baseline.test_metrics[primary]:.4f}): difference "
            f"{interval.text()} — **{interval.verdict}**"
        )
    return lines


COLD_HOW = {
    "popularity": "score 0 (no train positives): after every warm item with a positive, cold items in catalogue order",
    "bpr": "its untrained random initial factors and a zero bias (never a positive nor a negative): a random place",
    "bpr_fold_in": "the same untrained factors against the folded-in user vector: a random place",
    "item_knn": "co-occurrence 0 (no train users): after every warm item that co-occurs, in catalogue order",
    "next_item": "transition 0 (never watched in train): after every warm item that followed, in catalogue order",
    "two_tower": "its text: the item tower reads the cold item's title, year and genres",
}


def cold_start_section(
    spec: Any,
    evaluation: Evaluation,
    baselines: list[Evaluation],
    candidates: list[Evaluation],
    ranks: dict[str, list[int]],
    cold_rows: np.ndarray,
) -> list[str]:
    """The cold-start protocol's table: every model on the test users whose target is a cold item, how it
    ranks a cold item, and this model's ratio and paired difference (bootstrap over those users) with each."""
    primary = spec.primary_metric
    key = f"{COLD_PREFIX}{primary}"
    mine = np.asarray(ranks[evaluation.candidate.name])[cold_rows]
    mine_value = evaluation.test_metrics.get(key, 0.0)
    lines = [
        "## Cold-start targets (test)",
        "",
        f"{int(cold_rows.sum())} of {len(cold_rows)} evaluated users have a cold test item: it was never in train, "
        "so only its text can place it. The ratio column compares this model with each other one on cold "
        f"targets' {primary}.",
        "",
        f"| model | cold HR@10 | cold NDCG@10 | cold MRR | valid cold NDCG@10 | {evaluation.candidate.name} / model | "
        f"{evaluation.candidate.name} − model, cold {primary} [95% CI] | how it ranks a cold item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for other in [*baselines, *candidates]:
        name = other.candidate.name
        value = other.test_metrics.get(key)
        if value is None:
            continue
        ratio = "–" if name == evaluation.candidate.name else (f"{mine_value / value:.1f}x" if value > 0 else "∞")
        interval = (
            "–"
            if name == evaluation.candidate.name
            else paired_difference(mine, np.asarray(ranks[name])[cold_rows], primary).text()
        )
        how = COLD_HOW.get(name, "the ranker: text score, genres and year where collaborative features are 0")
        lines.append(
            f"| {name} | {other.test_metrics.get(COLD_PREFIX + 'hit_rate_at_10', 0):.4f} | {value:.4f} | "
            f"{other.test_metrics.get(COLD_PREFIX + 'mrr', 0):.4f} | "
            f"{other.validation_metrics.get(key, float('nan')):.4f} | {ratio} | {interval} | {how} |"
        )
    return [*lines, ""]


def model_card(
    spec: Any,
    dataset: RankingDatasetRef,
    baselines_ref: BaselinesRef,
    evaluation: Evaluation,
    rows: list[dict[str, Any]],
    comparisons: list[str] | None = None,
    cold_section: list[str] | None = None,
) -> str:
    """A candidate's card: what it is, the protocol, every model's numbers, how it was trained."""
    bundle = Path(evaluation.candidate.path)
    metadata = json.loads((bundle / "recommender.json").read_text())
    training_file = bundle / "encoder" / "training.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    losses = training.get("losses", [])
    ranker_file = bundle / "ranker.json"
    weights = json.loads(ranker_file.read_text()) if ranker_file.is_file() else None
    layers = json.loads((bundle / "encoder" / "config.json").read_text()).get("num_hidden_layers")
    lines = [
        f"# Model card: {spec.name} — `{evaluation.candidate.name}`",
        "",
        spec.description,
        "",
        "## What it does",
        "",
        "Ranks the catalogue for a user given their history (item ids and/or free texts): the user tower "
        f"(MiniLM, {layers} layers, mean pooling) reads the history text, most recent item first, truncated to "
        f"{metadata['history_max_length']} tokens; item vectors are precomputed; score = "
        + (
            "cosine similarity."
            if metadata["scorer"] == "text"
            else f"a conditional logit over the features {', '.join(metadata['features'])} "
            "(a history of free texts only is scored by the text model's cosine)."
        )
        + (
            f" The user tower is int8 dynamically quantized at load time ({metadata['compression']})."
            if metadata.get("compression")
            else ""
        ),
        "",
        "## Evaluation protocol",
        "",
        spec.protocol,
        "",
        f"Data: {dataset.num_users} users, {dataset.num_items} items, {dataset.num_interactions} interactions; "
        f"{dataset.evaluated_users} evaluated users (test set `{dataset.test_fingerprint}`, data "
        f"`{dataset.fingerprint}`).",
        "",
        "## Results: every model under the same protocol",
        "",
        markdown_table(rows),
        "",
        "`validation_ndcg_at_10` chooses between candidates; the gate uses test. Speed: user histories scored per "
        "second "
        "(encode + score the whole catalogue) on this machine's CPU, side by side; baselines have no per-request "
        "model.",
        "",
        "## Against the baselines (test, paired bootstrap over users)",
        "",
        f"Mean per-user difference of {spec.primary_metric} (this model − baseline) with its 95% interval "
        "(2,000 resamples of the evaluated users, the same resample for both models). An interval that "
        "includes 0 is a **tie** even when the difference is positive, and the gate promotes a model only if "
        "it **wins** against every baseline (interval above 0): a tie means it was not shown to beat that "
        "baseline, so nothing is promoted and the champion, if any, stays.",
        "",
        *(comparisons or ["- (no per-user ranks found)"]),
        "",
        *(cold_section or []),
        "## Training",
        "",
        f"- two-tower: {training.get('pairs', '?')} (history, next positive) pairs from the train split without each "
        "user's last "
        f"positive, {training.get('steps', '?')} steps, InfoNCE with in-batch negatives; loss {losses[0]:.3f} → "
        f"{sum(losses[-10:]) / len(losses[-10:]):.3f} "
        f"(first step → mean of the last 10); {training.get('seconds', 0):.0f} s."
        if losses
        else "- two-tower: no training record found.",
        f"- BPR feature model and baseline: {baselines_ref.bpr_best_epoch} epochs (chosen on validation NDCG@10).",
    ]
    if weights is not None:
        shown = ", ".join(f"{n} {w:+.3f}" for n, w in zip(weights["features"], weights["weights"], strict=True))
        lines.append(
            f"- ranker: fitted on each user's last train positive vs {metadata.get('ranker_negatives')} sampled "
            "unseen items, "
            f"features from models that never saw those positives; weights on standardised features: {shown}."
        )
    lines += [
        "",
        "## Limitations",
        "",
        "- Offline evaluation of one held-out item per user; a live A/B test measures what users do.",
        "- A history of free texts only has a text score and popularity: the collaborative features need catalogue "
        "ids.",
        "- Items outside the catalogue cannot be recommended; the catalogue is the one the model was trained with.",
    ]
    return "\n".join(lines) + "\n"


@task(name="rank-report")
def rank_report(
    spec: RankingSpec,
    dataset: RankingDatasetRef,
    baselines_ref: BaselinesRef,
    baselines: list[Evaluation],
    candidates: list[Evaluation],
) -> list[dict[str, Any]]:
    """Write each candidate's model card; publish the metrics table and the cards as artifacts."""
    require_shared(dataset, baselines_ref, baselines, candidates)
    log = run_logger(__name__)
    baselines, candidates = _as_evaluations(baselines), _as_evaluations(candidates)
    rows = model_rows(baselines, candidates)
    ranks = stored_test_ranks(baselines + candidates)
    data = RankingData.load(dataset.path)
    cold_rows = cold_target_rows(data.stage("test").targets, data.cold_mask)
    for evaluation in candidates:
        comparisons = baseline_comparisons(spec, evaluation, baselines, ranks)
        cold = (
            cold_start_section(spec, evaluation, baselines, candidates, ranks, cold_rows) if cold_rows.any() else None
        )
        card = model_card(spec, dataset, baselines_ref, evaluation, rows, comparisons, cold)
        (Path(evaluation.report_dir) / "model_card.md").write_text(card)
        try:
            create_markdown_artifact(
                markdown=card,
                key=artifact_key(dataset.domain, f"model-card-{evaluation.candidate.name}"),
                description=f"model card of {evaluation.candidate.name}",
            )
        except Exception as exc:  # the card is on disk; a UI hiccup must not fail the run
            log.warning("could not publish the model card of %s: %s", evaluation.candidate.name, exc)
    create_table_artifact(
        table=rows,
        key=artifact_key(dataset.domain, "models"),
        description=f"{dataset.domain}: every model under the declared protocol",
    )
    return rows
