"""The per-domain pipeline: ingest → fine-tune → compress → evaluate → deploy.

A thin flow: every step is a task in ``tasks/`` that takes paths and small records
and returns the same, so Prefect can cache each one on its inputs and code (a rerun
skips finished steps; a crashed run resumes), retry the steps that do I/O, and show
the artifacts each step publishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from domainflow.compression import RECIPES
from domainflow.gates import select_reference
from domainflow.fingerprint import path_fingerprint, value_fingerprint
from domainflow.records import DatasetRef, ModelRef
from domainflow.registry import ModelRegistry
from domains import get_domain
from tasks.compress import distill, prune_ffn, prune_magnitude, quantize
from tasks.deploy import candidate_rows, champion_metrics_for, deploy
from tasks.evaluate import evaluate
from tasks.finetune import finetune, linear_probe, make_train_config
from tasks.ingest import ingest
from tasks.report import report
from tasks.speed import measure_speed


def resolve_data_files(domain: str, data_dir: str | None, train_file: str | None, test_file: str | None) -> tuple[Path, Path]:
    """Explicit files win; else the domain's files, under ``data_dir`` when given."""
    spec = get_domain(domain)
    if train_file or test_file:
        if not (train_file and test_file):
            raise ValueError("give both --train-file and --test-file, or neither")
        return Path(train_file).resolve(), Path(test_file).resolve()
    paths = spec.source.resolve(data_dir)
    return paths["train"], paths["test"]


def compress_candidates(methods: tuple[str, ...], reference: ModelRef, dataset: DatasetRef, config: Any, options: dict) -> list[ModelRef]:
    """The domain's compression methods applied to the best fp32 model (a distilled student is also quantized
    with every int8 recipe the domain asks for)."""
    known = set(RECIPES) | {"magnitude_prune", "ffn_prune", "distill"}
    unknown = set(methods) - known
    if unknown:
        raise ValueError(f"unknown compression methods {sorted(unknown)}; known: {sorted(known)}")
    int8_recipes = [method for method in methods if method in RECIPES]
    candidates: list[ModelRef] = []
    for recipe in int8_recipes:
        candidates.append(quantize.with_options(**options)(reference, dataset.domain, recipe))
    if "magnitude_prune" in methods:
        candidates.append(prune_magnitude.with_options(**options)(reference, dataset.domain))
    if "ffn_prune" in methods:
        candidates.append(prune_ffn.with_options(**options)(reference, dataset, config))
    depth = json.loads((Path(reference.path) / "config.json").read_text())["num_hidden_layers"]
    student_layers = get_domain(dataset.domain).compression.student_layers
    if "distill" in methods and student_layers >= depth:
        get_run_logger().warning("distillation skipped: the student needs fewer than the teacher's %d layers, the domain asks for %d", depth, student_layers)
    elif "distill" in methods:
        student = distill.with_options(**options)(reference, dataset, config)
        candidates.append(student)
        for recipe in int8_recipes:
            candidates.append(quantize.with_options(**options)(student, dataset.domain, recipe))
    return candidates


def pipeline_for(domain: str) -> Any:
    """The flow that trains ``domain``, chosen by its task kind (never by its name)."""
    kind = get_domain(domain).task_kind
    if kind == "ranking":
        from flows.ranking import ranking_pipeline

        return ranking_pipeline
    if kind == "text_classification":
        return domain_pipeline
    raise ValueError(f"{domain}: no pipeline for task kind {kind!r}")


@flow(name="domain-pipeline", log_prints=True)
def domain_pipeline(
    domain: str = "customer_service",
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
) -> dict[str, Any]:
    """Train, compress, evaluate and (behind the domain's gates) deploy a model for ``domain``.

    Args:
        domain: a registered domain (``domainflow domains`` lists them).
        model: base encoder: ``minilm`` (default, shipped offline), a folder, or a hub name.
        data_dir: folder holding the domain's train/test files (default: the shipped data).
        train_file / test_file: explicit data files (CSV, JSON/JSONL, Parquet), both or neither.
        max_train_samples / max_test_samples: stratified subsamples, for quick runs.
        epochs: fine-tuning epochs (default: the domain's).
        seed: seeds sampling, splitting and training.
        num_layers: keep only the first N encoder layers (quick runs and tests).
        refresh_cache: recompute every step even if a cached result exists.
    """
    log = get_run_logger()
    spec = get_domain(domain)
    options = {"refresh_cache": True} if refresh_cache else {}

    train_path, test_path = resolve_data_files(domain, data_dir, train_file, test_file)
    source_fingerprint = value_fingerprint(path_fingerprint(train_path), path_fingerprint(test_path))
    dataset: DatasetRef = ingest.with_options(**options)(
        domain, str(train_path), str(test_path), source_fingerprint, max_train_samples=max_train_samples, max_test_samples=max_test_samples, seed=seed
    )
    log.info("dataset %s: %s", dataset.fingerprint, dataset.num_rows)

    config = make_train_config(domain, model, epochs=epochs, seed=seed, num_layers=num_layers)
    probe: ModelRef = linear_probe.with_options(**options)(dataset, config)
    tuned: ModelRef = finetune.with_options(**options)(dataset, probe, config)
    fp32 = [evaluate.with_options(**options)(candidate, dataset) for candidate in (probe, tuned)]

    reference = select_reference(fp32, spec.primary_metric).candidate  # the gate's own choice
    compressed = compress_candidates(spec.compression.methods, reference, dataset, config, options)
    evaluations = fp32 + [evaluate.with_options(**options)(candidate, dataset) for candidate in compressed]
    evaluations = measure_speed.with_options(**options)(evaluations, dataset)
    report(evaluations, dataset)

    champion_metrics = champion_metrics_for(domain, dataset.test_fingerprint)
    champion = ModelRegistry(domain).champion()
    if champion is not None and champion_metrics is None:
        log.info("champion v%d was measured on another test set: re-evaluating it on this one", champion.version)
        champion_ref = ModelRef(name=f"champion-v{champion.version}", path=str(champion.model_dir), fingerprint=path_fingerprint(champion.model_dir))
        champion_metrics = evaluate(champion_ref, dataset).test_metrics

    run_config = {"model": model, "data_files": [str(train_path), str(test_path)], "max_train_samples": max_train_samples, "max_test_samples": max_test_samples, "train_config": config.model_dump()}
    decision = deploy(domain, evaluations, champion_metrics, dataset.fingerprint, dataset.test_fingerprint, run_config)

    rows = candidate_rows(decision, evaluations)
    for row, evaluation in zip(rows, evaluations):
        row["texts_per_second_batch1"] = round(evaluation.texts_per_second_batch1, 1)
        row["train_seconds"] = round(evaluation.candidate.train_seconds, 1)
    summary = {
        "domain": domain,
        "dataset": dataset.model_dump(),
        "candidates": rows,
        "decision": decision,
        "champion_dir": decision.get("champion_dir"),
        "version": decision.get("version"),
    }
    return summary
