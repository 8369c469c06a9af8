"""Evaluate stage of a ranking domain: every model under the same protocol, then side-by-side speed.

All models — the baselines (popularity, BPR, BPR with the history folded in, item-kNN), the
two-tower text model, the ranker and its int8 copy — are
scored on the same users, with the same excluded items, ranks computed by
:func:`domainflow.recsys.protocol.target_ranks` and metrics by the project's ``evaluate``
modules (HR@10, NDCG@10, MRR), at the ``valid`` stage (model choice) and the ``test`` stage (the
gate). A bundle is evaluated by loading it from disk exactly as serving does.

Under the cold-start protocol each stage's metrics also hold ``cold_<metric>``: the same metric
over the users whose held-out item is a cold item (:func:`cold_metrics`).

Each report folder holds ``metrics.json`` and ``ranks.json`` (the held-out item's rank per
user, so any metric can be recomputed and two models compared user by user).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from scipy import sparse

from domainflow import settings
from domainflow.fingerprint import value_fingerprint
from domainflow.logs import run_logger
from domainflow.modeling import count_parameters, directory_size
from domainflow.records import Evaluation, ModelRef
from domainflow.recsys.baselines import fold_in_scores, item_knn_scores, next_item_baseline_scores, table_bytes
from domainflow.recsys.bundle import Recommender
from domainflow.recsys.dataset import RankingData, StageRows
from domainflow.recsys.features import (
    RECENT,
    TRANSITION_DECAY,
    TRANSITION_WINDOW,
    cooccurrence_cosine,
    transition_probabilities,
    warm_history,
)
from domainflow.recsys.protocol import cold_target_rows, ranking_metrics, target_ranks
from domainflow.recsys.records import BaselinesRef, RankingDatasetRef
from domainflow.recsys.spec import RankingSpec
from tasks.caching import CODE_AND_INPUTS, code_fingerprint, require_shared
from tasks.evaluate import weights_bytes

CACHE_DEPENDS_ON = ("domainflow/recsys",)
STAGES = ("valid", "test")
SPEED_BATCH = 32


COLD_PREFIX = "cold_"


def cold_metrics(ranks: np.ndarray, rows: StageRows, cold_mask: np.ndarray, metrics: tuple[str, ...]) -> dict:
    """``cold_<metric>`` over the rows whose target is a cold item, and their count (``cold_targets``);
    empty when no target is cold (the standard protocol)."""
    cold = cold_target_rows(rows.targets, cold_mask)
    if not cold.any():
        return {}
    values = ranking_metrics(np.asarray(ranks)[cold], metrics)
    return {f"{COLD_PREFIX}{name}": value for name, value in values.items()} | {"cold_targets": float(cold.sum())}


def stage_result(
    scores: np.ndarray, rows: StageRows, metrics: tuple[str, ...], cold_mask: np.ndarray | None = None
) -> tuple[dict[str, float], list[int]]:
    """Metrics of a stage (with the cold-target ones when ``cold_mask`` flags cold items) and the ranks."""
    ranks = target_ranks(scores, rows.targets, rows.excluded)
    values = ranking_metrics(ranks, metrics)
    if cold_mask is not None:
        values |= cold_metrics(ranks, rows, cold_mask, metrics)
    return values, [int(r) for r in ranks]


def write_report(
    domain: str, name: str, fingerprint: str, results: dict[str, tuple[dict[str, float], list[int]]]
) -> Path:
    out = (
        settings.runs_dir()
        / domain
        / "reports"
        / f"{name}-{value_fingerprint(fingerprint, code_fingerprint(__name__))}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({stage: metrics for stage, (metrics, _) in results.items()}, indent=2))
    (out / "ranks.json").write_text(json.dumps({stage: ranks for stage, (_, ranks) in results.items()}))
    return out


def _evaluation(candidate: ModelRef, results: dict, report_dir: Path, size_bytes: int, parameters: int) -> Evaluation:
    return Evaluation(
        candidate=candidate,
        test_metrics=results["test"][0],
        validation_metrics=results["valid"][0],
        size_bytes=size_bytes,
        disk_bytes=directory_size(Path(candidate.path)),
        parameters=parameters,
        report_dir=str(report_dir),
    )


BaselineScorer = Callable[[StageRows], np.ndarray]


def baseline_scorers(
    spec: RankingSpec, data: RankingData, arrays: dict[str, np.ndarray], baselines: BaselinesRef
) -> dict[str, tuple[BaselineScorer, int, int, float]]:
    """Each baseline the domain lists: (scorer of a stage's rows, bytes, parameters, train seconds).

    * ``popularity`` — train positives per item, the same list for everyone;
    * ``bpr`` — the trained user factors (they never saw the validation item);
    * ``bpr_fold_in`` — the same item factors, the user's vector refitted from the stage's whole
      history (at test: validation item included, as the ranker's history);
    * ``item_knn`` — co-occurrence (cosine of user sets, all train interactions) with the last
      :data:`~domainflow.recsys.features.RECENT` items of the history: no training;
    * ``next_item`` — where users went next (directed transitions within a window, all train
      interactions) after the last ``RECENT`` history items, the ranker's ``next_recent`` feature
      alone: the sequential signal of GRU4Rec/SASRec without a network.
    """
    cold = data.cold_mask
    warm = lambda rows: [warm_history(history, cold) for history in rows.histories]  # noqa: E731
    cooccurrence, knn_seconds = sparse.csr_array((0, 0), dtype=np.float32), 0.0
    if "item_knn" in spec.baselines:  # its only training: co-occurrence of all train interactions
        started = time.perf_counter()
        users, items = data.train["user_id"].map(data.index.user_pos), data.train["item_id"].map(data.index.item_pos)
        cooccurrence = cooccurrence_cosine(
            users.to_numpy(), items.to_numpy(), len(data.index.users), len(data.index.items), spec.item_neighbours
        )
        knn_seconds = time.perf_counter() - started
    transitions, transitions_seconds = sparse.csr_array((0, 0), dtype=np.float32), 0.0
    if "next_item" in spec.baselines:  # its only training: transition counts of all train interactions
        started = time.perf_counter()
        histories = data.histories_from(data.train)
        transitions = transition_probabilities(
            histories, len(data.index.items), TRANSITION_WINDOW, TRANSITION_DECAY, spec.item_neighbours
        )
        transitions_seconds = time.perf_counter() - started
    popularity = arrays["popularity"].astype(np.float64)
    bpr_keys = ("bpr_items", "bpr_bias")
    size = lambda keys: (sum(arrays[k].nbytes for k in keys), sum(arrays[k].size for k in keys))  # noqa: E731
    available: dict[str, tuple[BaselineScorer, int, int, float]] = {
        "popularity": (
            lambda rows: np.tile(popularity, (len(rows.users), 1)),
            *size(["popularity"]),
            baselines.train_seconds["popularity"],
        ),
        "bpr": (
            lambda rows: arrays["bpr_users"][rows.users] @ arrays["bpr_items"].T + arrays["bpr_bias"],
            *size(["bpr_users", *bpr_keys]),
            baselines.train_seconds["bpr"],
        ),
        "bpr_fold_in": (
            lambda rows: fold_in_scores(arrays["bpr_items"], arrays["bpr_bias"], warm(rows), spec.bpr.fold_in_reg),
            *size(bpr_keys),
            baselines.train_seconds["bpr"],
        ),
        "item_knn": (
            lambda rows: item_knn_scores(cooccurrence, warm(rows), RECENT),
            table_bytes(cooccurrence),
            0,
            knn_seconds,
        ),
        "next_item": (
            lambda rows: next_item_baseline_scores(transitions, warm(rows), RECENT),
            table_bytes(transitions),
            0,
            transitions_seconds,
        ),
    }
    return {name: available[name] for name in spec.baselines}


def baseline_report_key(spec: RankingSpec, dataset_fingerprint: str, baselines_fingerprint: str) -> str:
    """What, besides the code (:func:`write_report` adds it), shapes a baseline's metrics and per-user ranks, and so
    names its report folder: the split, the trained factors, the metrics, the fold-in ridge and the cap on the item
    tables' neighbours (``item_knn`` and ``next_item`` build their tables here). A field left out would let two
    settings share one folder, the second overwriting the ranks the first's cached evaluation points to."""
    return value_fingerprint(
        dataset_fingerprint, baselines_fingerprint, spec.metrics, spec.bpr.fold_in_reg, spec.item_neighbours
    )


@task(name="evaluate-baselines", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def evaluate_baselines(spec: RankingSpec, dataset: RankingDatasetRef, baselines: BaselinesRef) -> list[Evaluation]:
    """The domain's baselines (see :func:`baseline_scorers`) under the protocol, on both stages."""
    require_shared(dataset, baselines)
    from safetensors.numpy import load_file

    data = RankingData.load(dataset.path)
    arrays = load_file(str(Path(baselines.path) / "baselines.safetensors"))
    stages = {stage: data.stage(stage) for stage in STAGES}
    evaluations = []
    for name, (score, size_bytes, parameters, seconds) in baseline_scorers(spec, data, arrays, baselines).items():
        results = {
            stage: stage_result(score(rows), rows, spec.metrics, data.cold_mask) for stage, rows in stages.items()
        }
        report = write_report(
            dataset.domain, name, baseline_report_key(spec, dataset.fingerprint, baselines.fingerprint), results
        )
        ref = ModelRef(name=name, path=baselines.path, fingerprint=baselines.fingerprint, train_seconds=seconds)
        evaluations.append(_evaluation(ref, results, report, size_bytes, parameters))
    return evaluations


def stored_test_ranks(evaluations: list[Evaluation]) -> dict[str, list[int]]:
    """Each model's per-user test ranks from its report folder (``ranks.json``): what the gate's
    confidence intervals are computed from."""
    out = {}
    for evaluation in evaluations:
        path = Path(evaluation.report_dir) / "ranks.json"
        if not path.is_file():
            raise FileNotFoundError(f"{evaluation.candidate.name}: no per-user ranks at {path}")
        out[evaluation.candidate.name] = json.loads(path.read_text())["test"]
    return out


def evaluate_bundles(
    spec: RankingSpec, dataset: RankingDatasetRef, bundles: list[ModelRef], log: Any
) -> list[Evaluation]:
    """Each bundle on both stages; bundles sharing a user tower (encoder + compression) share its embeddings."""
    data = RankingData.load(dataset.path)
    stages = {stage: data.stage(stage) for stage in STAGES}
    shared: dict[tuple, np.ndarray] = {}
    evaluations = []
    for bundle in bundles:
        recommender = Recommender(Path(bundle.path), spec.history_text)
        if recommender.item_ids != data.index.items:
            raise ValueError(
                f"{bundle.name} ({bundle.path}) was built for another catalogue than this dataset's: it cannot be "
                "evaluated on it"
            )
        results = {}
        for stage, rows in stages.items():
            key = (*recommender.user_tower_key(), stage)
            if key not in shared:
                started = time.perf_counter()
                shared[key] = recommender.user_embeddings(rows.histories)
                log.info(
                    "%s: %d %s histories encoded in %.1f s",
                    bundle.name,
                    len(rows.histories),
                    stage,
                    time.perf_counter() - started,
                )
            scores = recommender.score_histories(rows.histories, shared[key])
            results[stage] = stage_result(scores, rows, spec.metrics, data.cold_mask)
        report = write_report(
            dataset.domain,
            bundle.name,
            value_fingerprint(dataset.fingerprint, bundle.fingerprint, spec.metrics),
            results,
        )
        size = weights_bytes(recommender.model) + recommender.tables.item_embeddings.nbytes
        evaluations.append(_evaluation(bundle, results, report, size, count_parameters(recommender.model)))
        log.info("%s: test %s", bundle.name, {k: round(v, 4) for k, v in results["test"][0].items()})
    return evaluations


@task(name="evaluate-recommenders", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def evaluate_recommenders(spec: RankingSpec, dataset: RankingDatasetRef, bundles: list[ModelRef]) -> list[Evaluation]:
    """The candidate bundles under the protocol, loaded from disk as serving loads them."""
    require_shared(dataset, bundles)
    return evaluate_bundles(spec, dataset, bundles, run_logger(__name__))


# ------------------------------------------------------------------------------------- speed


def _timed(call: Callable[..., Any], *args: Any) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def _ask(recommender: Recommender, history: list[int]) -> None:
    """One batch-1 request as the service makes it: item ids in, the top 10 out."""
    recommender.recommend(history=[recommender.item_ids[i] for i in history], k=10)


def speed_figures(
    recommenders: dict[str, Recommender], histories: list[list[int]], rounds: int = 3, singles: int = 4
) -> dict[str, dict[str, float]]:
    """Histories scored per second at batch 32 and batch 1, and batch-1 latency, side by side.

    The models take turns within each round, so a burst of load from another process hits all
    of them alike; the median of the rounds is kept.
    """
    batch = histories[:SPEED_BATCH]
    single = histories[SPEED_BATCH : SPEED_BATCH + singles] or batch[:singles]
    for recommender in recommenders.values():  # warm-up: first calls allocate and, for int8, pack weights
        recommender.score_histories(batch[:2])
    seconds32: dict[str, list[float]] = {name: [] for name in recommenders}
    seconds1: dict[str, list[float]] = {name: [] for name in recommenders}
    for _ in range(rounds):
        for name, recommender in recommenders.items():
            seconds32[name].append(_timed(recommender.score_histories, batch))
            for history in single:
                seconds1[name].append(_timed(_ask, recommender, history))
    return {
        name: {
            "texts_per_second_batch32": len(batch) / float(np.median(seconds32[name])),
            "texts_per_second_batch1": 1.0 / float(np.median(seconds1[name])),
            "latency_ms_p50": 1000 * float(np.percentile(seconds1[name], 50)),
            "latency_ms_p95": 1000 * float(np.percentile(seconds1[name], 95)),
        }
        for name in recommenders
    }


@task(name="measure-rank-speed", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def measure_rank_speed(
    spec: RankingSpec, dataset: RankingDatasetRef, evaluations: list[Evaluation]
) -> list[Evaluation]:
    """The evaluations with their speed fields filled ("texts" here are user histories)."""
    require_shared(dataset, evaluations)
    log = run_logger(__name__)
    evaluations = [e if isinstance(e, Evaluation) else Evaluation.model_validate(e) for e in evaluations]
    histories = [h for h in RankingData.load(dataset.path).stage("valid").histories if h]
    recommenders = {e.candidate.name: Recommender(Path(e.candidate.path), spec.history_text) for e in evaluations}
    figures = speed_figures(recommenders, histories)
    for name, numbers in figures.items():
        log.info(
            "%s: %.1f histories/s at batch 32, p50 %.1f ms per request",
            name,
            numbers["texts_per_second_batch32"],
            numbers["latency_ms_p50"],
        )
    return [e.model_copy(update=figures[e.candidate.name]) for e in evaluations]
