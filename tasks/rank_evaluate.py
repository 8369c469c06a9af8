"""Evaluate stage of a ranking domain: every model under the same protocol, then side-by-side speed.

All models — popularity, BPR, the two-tower text model, the ranker and its int8 copy — are
scored on the same users, with the same excluded items, ranks computed by
:func:`domainflow.recsys.protocol.target_ranks` and metrics by the project's ``evaluate``
modules (HR@10, NDCG@10, MRR), at the ``valid`` stage (model choice) and the ``test`` stage (the
gate). A bundle is evaluated by loading it from disk exactly as serving does.

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

from domainflow import settings
from domainflow.fingerprint import value_fingerprint
from domainflow.logs import run_logger
from domainflow.modeling import count_parameters, directory_size
from domainflow.records import Evaluation, ModelRef
from domainflow.recsys.bundle import Recommender
from domainflow.recsys.dataset import RankingData, StageRows
from domainflow.recsys.protocol import ranking_metrics, target_ranks
from domainflow.recsys.records import BaselinesRef, RankingDatasetRef
from domainflow.recsys.spec import RankingSpec
from tasks.caching import CODE_AND_INPUTS, code_fingerprint, require_shared
from tasks.evaluate import weights_bytes

CACHE_DEPENDS_ON = ("domainflow/recsys",)
STAGES = ("valid", "test")
SPEED_BATCH = 32


def stage_result(scores: np.ndarray, rows: StageRows, metrics: tuple[str, ...]) -> tuple[dict[str, float], list[int]]:
    ranks = target_ranks(scores, rows.targets, rows.excluded)
    return ranking_metrics(ranks, metrics), [int(r) for r in ranks]


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


@task(name="evaluate-baselines", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def evaluate_baselines(spec: RankingSpec, dataset: RankingDatasetRef, baselines: BaselinesRef) -> list[Evaluation]:
    """Popularity (train positives per item) and BPR (its trained user factors) under the protocol."""
    require_shared(dataset, baselines)
    from safetensors.numpy import load_file

    data = RankingData.load(dataset.path)
    arrays = load_file(str(Path(baselines.path) / "baselines.safetensors"))
    scorers = {
        "popularity": (
            lambda users: np.tile(arrays["popularity"].astype(np.float64), (len(users), 1)),
            ["popularity"],
            baselines.train_seconds["popularity"],
        ),
        "bpr": (
            lambda users: arrays["bpr_users"][users] @ arrays["bpr_items"].T + arrays["bpr_bias"],
            ["bpr_users", "bpr_items", "bpr_bias"],
            baselines.train_seconds["bpr"],
        ),
    }
    evaluations = []
    for name, (score, keys, seconds) in scorers.items():
        results = {}
        for stage in STAGES:
            rows = data.stage(stage)
            results[stage] = stage_result(score(rows.users), rows, spec.metrics)
        report = write_report(
            dataset.domain, name, value_fingerprint(dataset.fingerprint, baselines.fingerprint, spec.metrics), results
        )
        ref = ModelRef(name=name, path=baselines.path, fingerprint=baselines.fingerprint, train_seconds=seconds)
        evaluations.append(
            _evaluation(ref, results, report, sum(arrays[k].nbytes for k in keys), sum(arrays[k].size for k in keys))
        )
    return evaluations


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
            results[stage] = stage_result(recommender.score_histories(rows.histories, shared[key]), rows, spec.metrics)
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
