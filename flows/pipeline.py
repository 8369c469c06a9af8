"""The per-domain pipeline: ingest → fine-tune → compress → evaluate → deploy.

A thin flow: every step is a task in ``tasks/`` that takes paths and small records
and returns the same, so Prefect can cache each one on its inputs and code (a rerun
skips finished steps; a crashed run resumes), retry the steps that do I/O, and show
the artifacts each step publishes.

Steps are submitted to the flow's task runner (``flows/runners.py``) and their futures
resolved where the flow needs a value: steps that do not depend on each other (the
evaluations of the candidates, the compressions of the reference) run side by side on a
runner with several workers. The default runner has one thread, so a default run does
its steps one after another, in the order they are submitted, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from domainflow import settings
from domainflow.atomic import clean_stale_partials
from domainflow.catalog import get_domain
from domainflow.compression import RECIPES
from domainflow.data.validation import DataValidationError
from domainflow.fingerprint import path_fingerprint, value_fingerprint
from domainflow.gates import select_reference
from domainflow.kinds import kind_of, resolve
from domainflow.logs import run_logger
from domainflow.records import DatasetRef, Evaluation, ModelRef
from domainflow.registry import ModelRegistry
from domainflow.runlock import domain_run_lock
from domainflow.spec import ClassificationSpec, CompressionDefaults, DomainSpec, EnsembleSettings
from flows.runners import runner_name, thread_pool
from tasks.compress import distill, prune_ffn, prune_magnitude, quantize
from tasks.deploy import candidate_rows, champion_damage, champion_metrics_for, deploy
from tasks.evaluate import evaluate
from tasks.finetune import finetune, linear_probe, make_train_config
from tasks.fuse import build_cascade, build_ensemble
from tasks.ingest import ingest
from tasks.peft_train import adapter_candidates
from tasks.private_train import private_candidates
from tasks.report import report
from tasks.speed import measure_speed


def resolve_data_files(
    spec: ClassificationSpec, data_dir: str | None, train_file: str | None, test_file: str | None
) -> tuple[Path, Path]:
    """Explicit files win; else the domain's files, under ``data_dir`` when given."""
    if train_file or test_file:
        if not (train_file and test_file):
            raise ValueError("give both --train-file and --test-file, or neither")
        return Path(train_file).resolve(), Path(test_file).resolve()
    paths = spec.source.resolve(data_dir)
    return paths["train"], paths["test"]


def check_labels_match_champion(spec: ClassificationSpec, dataset: DatasetRef, registry: ModelRegistry) -> None:
    """A domain without a label list takes its labels from the data (sorted); a later run whose data holds
    another label set would silently re-number the classes, so it stops here with both lists instead."""
    if spec.label_names is not None:
        return
    champion = registry.champion()
    if champion is None:
        return
    trained = champion.lineage.get("labels")
    if trained and list(trained) != list(dataset.label_names):
        new, gone = sorted(set(dataset.label_names) - set(trained)), sorted(set(trained) - set(dataset.label_names))
        raise DataValidationError(
            f"{spec.name}: the training data's labels differ from those champion v{champion.version} was trained with "
            f"(new: {new or 'none'}; missing: {gone or 'none'}). The domain file lists no labels, so they come from "
            "the data; "
            "to change the label set on purpose, list `labels = [...]` in the domain file (a new label list starts a "
            "new model line)."
        )


#: Compressions that train on the training split without DP (FFN pruning's recovery epochs, distillation) and the
#: cascade built on the distilled student: under ``gates.max_epsilon`` the gate refuses them, so none is built.
TRAINED_WITHOUT_DP = ("ffn_prune", "distill", "cascade")


def private_compression(compression: CompressionDefaults, max_epsilon: float | None) -> CompressionDefaults:
    """The domain's compressions, less those a ``max_epsilon`` gate would refuse whatever they scored (int8 and
    magnitude pruning keep their parent's guarantee; a retrained model has none)."""
    dropped = [method for method in compression.methods if method in TRAINED_WITHOUT_DP]
    if max_epsilon is None or not dropped:
        return compression
    run_logger(__name__).info(
        "gates.max_epsilon %g: %s not built (trained without DP, the gate would refuse them)",
        max_epsilon,
        ", ".join(dropped),
    )
    kept: CompressionDefaults = compression.replace(
        methods=tuple(m for m in compression.methods if m not in TRAINED_WITHOUT_DP)
    )
    return kept


def compress_candidates(
    compression: CompressionDefaults,
    reference: ModelRef,
    dataset: DatasetRef,
    config: Any,
    options: dict,
    *,
    torch_reference: ModelRef | None = None,
    soft_labels_from: ModelRef | None = None,
) -> list[Any]:
    """The domain's compression methods applied to the best fp32 model (a distilled student is also quantized
    with every int8 recipe the domain asks for), submitted at once: they depend only on the reference (a
    student's int8 copies on the student's future), so a runner with several workers builds them side by side.
    Futures of ``ModelRef`` (typed ``Any``: Prefect resolves a future given as an input), in report order.

    When the reference is an ensemble, ``torch_reference`` is the best single model: int8 and pruning apply to
    one network, so they are skipped, and the student takes its first layers from that model while learning
    from ``soft_labels_from`` (the ensemble). Every child names the reference as its parent for the gate."""
    methods = compression.methods
    known = set(RECIPES) | {"magnitude_prune", "ffn_prune", "distill", "cascade"}
    unknown = set(methods) - known
    if unknown:
        raise ValueError(f"unknown compression methods {sorted(unknown)}; known: {sorted(known)}")
    log = get_run_logger()
    torch_reference = torch_reference or reference
    single = torch_reference.name == reference.name
    int8_recipes = [method for method in methods if method in RECIPES]
    candidates: list[Any] = []
    reference_int8: list[Any] = []
    if not single:
        log.info(
            "the reference %s is an ensemble: int8 and pruning (of one network) are skipped; the student starts "
            "from %s",
            reference.name,
            torch_reference.name,
        )
    else:
        for recipe in int8_recipes:
            reference_int8.append(quantize.with_options(**options).submit(reference, dataset.domain, recipe))
        candidates.extend(reference_int8)
        if "magnitude_prune" in methods:
            candidates.append(
                prune_magnitude.with_options(**options).submit(reference, dataset.domain, compression.sparsity)
            )
        if "ffn_prune" in methods:
            candidates.append(
                prune_ffn.with_options(**options).submit(
                    reference, dataset, config, compression.ffn_keep_ratio, compression.recovery_epochs
                )
            )
    depth = json.loads((Path(torch_reference.path) / "config.json").read_text())["num_hidden_layers"]
    student_layers = compression.student_layers
    if "distill" in methods and student_layers >= depth:
        log.warning(
            "distillation skipped: the student needs fewer than the teacher's %d layers, the domain asks for %d",
            depth,
            student_layers,
        )
    elif "distill" in methods:
        epochs = compression.distill_epochs if compression.distill_epochs is not None else config.epochs
        student: Any = distill.with_options(**options).submit(
            torch_reference,
            dataset,
            config,
            student_layers,
            epochs,
            compression.distill_temperature,
            compression.distill_alpha,
            soft_labels_from=soft_labels_from,
            parent=reference.name,
        )
        candidates.append(student)
        student_int8 = [
            quantize.with_options(**options).submit(student, dataset.domain, recipe) for recipe in int8_recipes
        ]
        candidates.extend(student_int8)
        if "cascade" in methods:
            # fast: the student as served (its first int8 copy); strong: the reference as served (likewise)
            fast: Any = (student_int8 or [student])[0]  # futures stand in for their records (see above)
            strong: Any = (reference_int8 or [reference])[0]
            candidates.append(
                build_cascade.with_options(**options).submit(
                    fast,
                    strong,
                    reference.name,
                    dataset,
                    compression.cascade_margin,
                    compression.cascade_max_passed_on,
                )
            )
    elif "cascade" in methods:
        log.warning("cascade skipped: its fast model is the distilled student, and no student is built")
    return candidates


def ensemble_candidate(
    ensemble: EnsembleSettings, fp32: list[Evaluation], dataset: DatasetRef, options: dict
) -> ModelRef | None:
    """The ensemble of the fp32 candidates the domain names (None, with a warning, when one is missing)."""
    by_name = {evaluation.candidate.name: evaluation.candidate for evaluation in fp32}
    missing = [name for name in ensemble.members if name not in by_name]
    if missing:
        get_run_logger().warning(
            "ensemble skipped: %s not among this run's fp32 candidates (%s)", ", ".join(missing), ", ".join(by_name)
        )
        return None
    members = [by_name[name] for name in ensemble.members]
    result: ModelRef = build_ensemble.with_options(**options).submit(members, dataset, ensemble).result()
    return result


def pipeline_for(domain: str | DomainSpec) -> Any:
    """The flow that trains a domain (a name, a file or a spec), chosen by its task kind (never by its name)."""
    spec = get_domain(domain) if isinstance(domain, str) else domain
    return resolve(kind_of(spec).flow)


# One thread by default: see flows/runners.py (a training step already uses every core; two at once in one
# process would share torch's random state). `domainflow run --task-runner/--workers` picks another.
@flow(name="domain-pipeline", log_prints=True, task_runner=thread_pool(1))
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
    wait_for_lock: bool = True,
    report_to: list[str] | None = None,
) -> dict[str, Any]:
    """Train, compress, evaluate and (behind the domain's gates) deploy a model for ``domain``.

    Args:
        domain: a registered domain (``domainflow domains`` lists them) or a domain file's path.
        model: base encoder: ``minilm`` (default, shipped offline), a folder, or a hub name.
        data_dir: folder holding the domain's train/test files (default: the shipped data).
        train_file / test_file: explicit data files (CSV, JSON/JSONL, Parquet), both or neither.
        max_train_samples / max_test_samples: stratified subsamples, for quick runs.
        epochs: fine-tuning epochs (default: the domain's).
        seed: seeds sampling, splitting and training.
        num_layers: keep only the first N encoder layers (quick runs and tests).
        refresh_cache: recompute every step even if a cached result exists.
        wait_for_lock: when another run of the domain is going, wait for it (else fail at once).
        report_to: where training reports (tensorboard, mlflow); default: the domain's ``training.report_to``.
    """
    log = get_run_logger()
    spec = get_domain(domain)
    if not isinstance(spec, ClassificationSpec):
        raise ValueError(f"{spec.name} is a {spec.task_kind} domain; this pipeline trains text classification domains")
    with domain_run_lock(
        spec.name, wait=wait_for_lock, on_wait=log.warning, description=f"domain-pipeline run of {spec.name}"
    ):
        return _train_and_deploy(
            spec,
            model,
            data_dir,
            train_file,
            test_file,
            max_train_samples,
            max_test_samples,
            epochs,
            seed,
            num_layers,
            refresh_cache,
            report_to,
        )


def _train_and_deploy(
    spec: ClassificationSpec,
    model: str | None,
    data_dir: str | None,
    train_file: str | None,
    test_file: str | None,
    max_train_samples: int | None,
    max_test_samples: int | None,
    epochs: float | None,
    seed: int,
    num_layers: int | None,
    refresh_cache: bool,
    report_to: list[str] | None = None,
) -> dict[str, Any]:
    """The pipeline's steps, run while holding the domain's run lock."""
    log = get_run_logger()
    domain = spec.name
    registry = ModelRegistry(domain)
    for leftover in clean_stale_partials(settings.runs_dir() / domain):
        log.warning("removed %s, left half-built by a run that died", leftover)
    options: dict[str, Any] = {"refresh_cache": True} if refresh_cache else {}

    train_path, test_path = resolve_data_files(spec, data_dir, train_file, test_file)
    source_fingerprint = value_fingerprint(path_fingerprint(train_path), path_fingerprint(test_path))
    dataset: DatasetRef = (
        ingest.with_options(**options)
        .submit(
            spec.data_slice(),
            domain,
            str(train_path),
            str(test_path),
            source_fingerprint,
            max_train_samples=max_train_samples,
            max_test_samples=max_test_samples,
            seed=seed,
        )
        .result()
    )
    log.info("dataset %s: %s", dataset.fingerprint, dataset.num_rows)
    check_labels_match_champion(spec, dataset, registry)
    if spec.label_names is None:
        spec = spec.with_labels(tuple(dataset.label_names))
        log.info(
            "%s: %d labels taken from the training data: %s", domain, spec.num_labels, ", ".join(spec.label_names or ())
        )

    config = make_train_config(spec, model, epochs=epochs, seed=seed, num_layers=num_layers, report_to=report_to)
    # Futures stand in for the records they will hold (typed Any): Prefect resolves them as inputs.
    probe: Any = linear_probe.with_options(**options).submit(dataset, config)
    tuned: Any = finetune.with_options(**options).submit(dataset, probe, config)
    adapted = adapter_candidates(spec.peft, dataset, probe, config, options)  # LoRA, IA3… beside the fine-tune
    # Issue 15: DP-SGD (dp-head, dp-lora) and federated (federated-head, federated-lora) candidates, from the
    # pretrained encoder (not the probe); none unless the domain's [privacy] / [federated] tables name methods.
    private = private_candidates(spec.privacy, spec.federated, spec.peft, dataset, config, options)
    measured = spec.evaluation_slice()
    # The probe's evaluation needs only the probe: on several workers it runs while fine-tuning goes on.
    trained = (probe, tuned, *adapted, *private)
    fp32_runs = [evaluate.with_options(**options).submit(candidate, dataset, measured) for candidate in trained]
    for step in trained:  # upstream first: a failed step raises its own error, not its dependents' "not run"
        step.result()
    fp32: list[Evaluation] = [run.result() for run in fp32_runs]
    single_models = list(fp32)
    ensemble = ensemble_candidate(spec.ensemble, fp32, dataset, options) if spec.ensemble is not None else None
    if ensemble is not None:  # an uncompressed candidate like the others: it may become the reference
        fp32.append(evaluate.with_options(**options).submit(ensemble, dataset, measured).result())

    max_epsilon = spec.gates.max_epsilon  # a domain that requires DP ranks only private candidates
    reference = select_reference(fp32, spec.primary_metric, max_epsilon).candidate  # the gate's own choice
    compressed = compress_candidates(
        private_compression(spec.compression, max_epsilon),
        reference,
        dataset,
        config,
        options,
        torch_reference=select_reference(single_models, spec.primary_metric, max_epsilon).candidate,
        soft_labels_from=ensemble if spec.ensemble is not None and spec.ensemble.distill_from_ensemble else None,
    )
    # Each compressed candidate is evaluated as soon as it exists, beside the compressions still running.
    compressed_runs = [
        evaluate.with_options(**options).submit(candidate, dataset, measured) for candidate in compressed
    ]
    for step in compressed:  # each compression's own error first (in order: a student before its int8 copies)
        step.result()
    evaluations = fp32 + [run.result() for run in compressed_runs]
    evaluations = measure_speed.with_options(**options).submit(evaluations, dataset).result()
    report(evaluations, dataset, spec)

    champion_metrics = champion_metrics_for(domain, dataset.test_fingerprint)
    champion = registry.champion()
    if champion is not None and champion_metrics is None and champion_damage(registry, champion) is None:
        log.info("champion v%d was measured on another test set: re-evaluating it on this one", champion.version)
        champion_ref = ModelRef(
            name=f"champion-v{champion.version}",
            path=str(champion.model_dir),
            fingerprint=path_fingerprint(champion.model_dir),
        )
        champion_metrics = evaluate(champion_ref, dataset, measured).test_metrics

    run_config = {
        "model": model,
        "data_files": [str(train_path), str(test_path)],
        "max_train_samples": max_train_samples,
        "max_test_samples": max_test_samples,
        "train_config": config.model_dump(),
    }
    decision = deploy(
        spec,
        evaluations,
        champion_metrics,
        dataset.fingerprint,
        dataset.test_fingerprint,
        run_config,
        labels=list(dataset.label_names),
    )

    rows = candidate_rows(decision, evaluations)
    for row, evaluation in zip(rows, evaluations, strict=True):
        row["texts_per_second_batch1"] = round(evaluation.texts_per_second_batch1 or 0.0, 1)
        row["train_seconds"] = round(evaluation.candidate.train_seconds, 1)
    summary = {
        "domain": domain,
        "task_runner": runner_name(),
        "flow_run_id": flow_run.id,
        "dataset": dataset.model_dump(),
        "candidates": rows,
        "decision": decision,
        "champion_dir": decision.get("champion_dir"),
        "version": decision.get("version"),
    }
    return summary
