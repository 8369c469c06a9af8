"""The pipeline of a ranking domain: ingest → fine-tune → compress → evaluate → deploy.

Same stages and contracts as :mod:`flows.pipeline` (tasks exchange paths and small records,
cached on inputs and code; every decision recorded), with the models a recommender needs:

1. ingest — interactions + items (MovieLens-100K fetched on first use, or ``--data-dir`` with
   ``interactions.*`` and ``items.*``), validated and split by the domain's protocol;
2. fine-tune — popularity and BPR baselines, the two-tower text model, its bundle with
   precomputed item embeddings (``two_tower``), and the ranker over it (``ranker``);
3. compress — the better of the two on validation NDCG@10 gets an int8 user tower;
4. evaluate — all five models on the same users and items; speed of the three bundles side by side;
5. deploy — the gate: the usual rules, plus "beat every baseline on test NDCG@10".

Steps are submitted to the flow's task runner (``flows/runners.py``): the baselines and the two-tower
encoder train side by side on a runner with several workers, and the baselines are evaluated while
the text models train. The default runner has one thread: one step after another, as before.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from domainflow import settings
from domainflow.atomic import clean_stale_partials
from domainflow.catalog import get_domain
from domainflow.fingerprint import path_fingerprint, value_fingerprint
from domainflow.gates import select_reference
from domainflow.records import ModelRef
from domainflow.recsys.spec import RankingSpec
from domainflow.registry import ModelRegistry
from domainflow.runlock import domain_run_lock
from flows.runners import runner_name, thread_pool
from tasks.deploy import champion_metrics_for
from tasks.rank_compress import quantize_user_tower
from tasks.rank_deploy import deploy_ranking
from tasks.rank_evaluate import evaluate_baselines, evaluate_recommenders, measure_rank_speed
from tasks.rank_ingest import ingest_interactions
from tasks.rank_report import COLUMNS, rank_report
from tasks.rank_train import build_item_tables, finetune_two_tower, fit_ranker, make_two_tower_config, train_baselines


@flow(name="ranking-pipeline", log_prints=True, task_runner=thread_pool(1))  # see flows/runners.py
def ranking_pipeline(
    domain: str = "recommendation",
    model: str | None = None,
    data_dir: str | None = None,
    train_file: str | None = None,
    test_file: str | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    epochs: float | None = None,
    seed: int = 42,
    num_layers: int | None = None,
    refresh_cache: bool = False,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Train, compress, evaluate and (behind the gate) deploy a recommender for ``domain``.

    Args mirror :func:`flows.pipeline.domain_pipeline` so one CLI drives both:
        model: base encoder (``minilm``, a folder, or a hub name).
        data_dir: folder with ``interactions.*`` and ``items.*`` (default: MovieLens-100K, fetched).
        train_file / test_file: not used by ranking domains (an error says so).
        max_train_samples: keep a seeded sample of this many users (quick runs).
        max_test_samples: ignored with a warning (every user with enough positives is evaluated; sample users
            instead), so that one `run --all --max-test-samples N` can slice the classification domains.
        epochs: two-tower epochs (default: the domain's).
        num_layers: keep only the first N encoder layers (quick runs and tests).
    """
    log = get_run_logger()
    spec = get_domain(domain)
    if not isinstance(spec, RankingSpec):
        raise ValueError(f"{spec.name} is a {spec.task_kind} domain; the ranking pipeline trains ranking domains only")
    if train_file or test_file:
        raise ValueError(
            "ranking domains read --data-dir (interactions.* and items.*) and sample users with --max-train-samples; "
            "--train-file and --test-file do not apply"
        )
    if max_test_samples:  # a warning, not an error: `run --all --max-test-samples N` slices the other domains
        log.warning(
            "%s: --max-test-samples does not apply to a ranking domain (every user with enough positives is "
            "evaluated; --max-train-samples samples users): ignored",
            spec.name,
        )
    with domain_run_lock(
        spec.name, wait=wait_for_lock, on_wait=log.warning, description=f"ranking-pipeline run of {spec.name}"
    ):
        return _train_and_deploy(spec, model, data_dir, max_train_samples, epochs, seed, num_layers, refresh_cache)


def _train_and_deploy(
    spec: RankingSpec,
    model: str | None,
    data_dir: str | None,
    max_train_samples: int | None,
    epochs: float | None,
    seed: int,
    num_layers: int | None,
    refresh_cache: bool,
) -> dict[str, Any]:
    """The ranking pipeline's steps, run while holding the domain's run lock."""
    log = get_run_logger()
    domain = spec.name
    for leftover in clean_stale_partials(settings.runs_dir() / domain):
        log.warning("removed %s, left half-built by a run that died", leftover)
    options: dict[str, Any] = {"refresh_cache": True} if refresh_cache else {}

    files = spec.source_files(data_dir)
    source_fingerprint = value_fingerprint(*(path_fingerprint(path) for path in files.values()))
    dataset = (
        ingest_interactions.with_options(**options)
        .submit(spec, {k: str(v) for k, v in files.items()}, source_fingerprint, max_users=max_train_samples, seed=seed)
        .result()
    )

    # The baselines and the text encoder need only the dataset: submitted together, they train side by side
    # on a runner with several workers (one after another on the default runner, in this order).
    baselines_run = train_baselines.with_options(**options).submit(spec, dataset, seed)
    config = make_two_tower_config(spec, model, epochs=epochs, seed=seed, num_layers=num_layers)
    # Futures stand in for the records they will hold (typed Any): Prefect resolves them as inputs.
    encoder: Any = finetune_two_tower.with_options(**options).submit(spec, dataset, config)
    baselines_ref = baselines_run.result()
    two_tower: Any = build_item_tables.with_options(**options).submit(spec, dataset, encoder, baselines_ref, config)
    ranker: Any = fit_ranker.with_options(**options).submit(spec, dataset, two_tower, config)

    baselines_eval = evaluate_baselines.with_options(**options).submit(spec, dataset, baselines_ref)
    for step in (encoder, two_tower, ranker):  # upstream first: a failed step raises its own error, not "not run"
        step.result()
    fp32 = evaluate_recommenders.with_options(**options).submit(spec, dataset, [two_tower, ranker]).result()
    reference = select_reference(fp32, spec.primary_metric).candidate  # the gate's own choice, on validation
    compressed: Any = quantize_user_tower.with_options(**options).submit(spec, reference)
    compressed.result()
    evaluations = fp32 + evaluate_recommenders.with_options(**options).submit(spec, dataset, [compressed]).result()
    evaluations = measure_rank_speed.with_options(**options).submit(spec, dataset, evaluations).result()
    baselines = baselines_eval.result()
    rank_report(spec, dataset, baselines_ref, baselines, evaluations)

    champion_metrics = champion_metrics_for(domain, dataset.test_fingerprint)
    champion = ModelRegistry(domain).champion()
    if champion is not None and champion_metrics is None:
        log.info("champion v%d was measured on another test set: re-evaluating it on this one", champion.version)
        champion_ref = ModelRef(
            name=f"champion-v{champion.version}",
            path=str(champion.model_dir),
            fingerprint=path_fingerprint(champion.model_dir),
        )
        champion_metrics = evaluate_recommenders(spec, dataset, [champion_ref])[0].test_metrics

    run_config = {
        "model": model,
        "data_files": {k: str(v) for k, v in files.items()},
        "max_users": max_train_samples,
        "two_tower_config": config.model_dump(),
    }
    decision = deploy_ranking(
        spec, evaluations, baselines, champion_metrics, dataset.fingerprint, dataset.test_fingerprint, run_config
    )
    return {
        "domain": domain,
        "task_runner": runner_name(),
        "flow_run_id": flow_run.id,
        "dataset": dataset.model_dump(),
        "columns": list(COLUMNS),
        "candidates": decision.pop("rows"),
        "decision": decision,
        "champion_dir": decision.get("champion_dir"),
        "version": decision.get("version"),
    }
