"""Fused candidates from models the run already has (no training): an ensemble, and a cascade.

**Ensemble**: the weighted mean of the class probabilities of the run's fp32 candidates named in the domain's
``[ensemble]`` table (equal weights, or fit on validation). It is an uncompressed candidate: it competes for the
reference like the others, and a distilled student can learn from its soft labels.

**Cascade**: a fast compressed model that hands what it is unsure of to a stronger one. The threshold is
calibrated on the validation split
(:func:`domainflow.fusion.calibrate_threshold`) and the two members are copied into one folder that loads, serves
and is measured like any candidate. For the gates it is a compressed child of the reference (``compression =
"cascade"``, ``parent`` = the reference): it must stay within the accuracy budget of the reference and be
measurably faster, like any compression; a cascade whose calibration could not meet its margin within the share
it may pass on carries ``calibration.met = false`` and the gate rejects it quoting those numbers.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from prefect import task

from domainflow import settings
from domainflow.fingerprint import path_fingerprint
from domainflow.fusion import CASCADE, ENSEMBLE, calibrate_threshold, fit_weights, write_fused
from domainflow.logs import run_logger
from domainflow.modeling import load_classifier, predict_proba
from domainflow.records import DatasetRef, ModelRef
from domainflow.spec import EnsembleSettings
from tasks.caching import CODE_AND_INPUTS, require_shared, step_dir
from tasks.finetune import finish_atomically

CASCADE_COMPRESSION = "cascade"


def validation_probabilities(model: ModelRef, dataset: DatasetRef) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, labels) of the validation split: what calibration may look at (never test)."""
    from datasets import load_from_disk

    validation = load_from_disk(dataset.path)["validation"]
    probabilities = predict_proba(load_classifier(model.path), list(validation["text"])).numpy()
    return probabilities, np.asarray(validation["label"])


def build_cascade_model(
    fast: ModelRef,
    strong: ModelRef,
    reference: str,
    dataset: DatasetRef,
    margin: float,
    max_passed_on: float,
    out_dir: Path,
) -> ModelRef:
    """Calibrate the threshold on validation and write the cascade's folder (pure: no Prefect needed)."""
    log = run_logger(__name__)
    fast_probabilities, labels = validation_probabilities(fast, dataset)
    strong_probabilities, _ = validation_probabilities(strong, dataset)
    calibration = calibrate_threshold(fast_probabilities, strong_probabilities, labels, margin, max_passed_on)
    log.info("cascade %s -> %s: %s", fast.name, strong.name, calibration.describe())
    name = f"cascade-{fast.name}"
    write_fused(
        out_dir,
        CASCADE,
        [Path(fast.path), Path(strong.path)],
        {
            "threshold": calibration.threshold,
            "fast": fast.name,
            "strong": strong.name,
            "calibration": asdict(calibration),
        },
        {
            "candidate": name,
            "parent": reference,
            "compression": CASCADE_COMPRESSION,
            "train_seconds": 0.0,
        },
    )
    return ModelRef(
        name=name,
        path=str(out_dir),
        fingerprint=path_fingerprint(out_dir),
        parent=reference,
        compression=CASCADE_COMPRESSION,
        train_seconds=fast.train_seconds,  # what it cost to have the fast model (the strong one exists anyway)
    )


@task(name="cascade", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def build_cascade(
    fast: ModelRef, strong: ModelRef, reference: str, dataset: DatasetRef, margin: float, max_passed_on: float
) -> ModelRef:
    """A cascade from ``fast`` to ``strong`` judged against ``reference``; cached on both models, the
    validation data and the calibration's settings."""
    require_shared(fast, strong, dataset)
    target = step_dir(
        models_dir(dataset),
        f"cascade-{fast.name}",
        build_cascade,
        fast.fingerprint,
        strong.fingerprint,
        reference,
        dataset.fingerprint,
        margin,
        max_passed_on,
    )
    return finish_atomically(
        lambda out: build_cascade_model(fast, strong, reference, dataset, margin, max_passed_on, out), target
    )


ENSEMBLE_NAME = "ensemble"


def build_ensemble_model(
    members: list[ModelRef], dataset: DatasetRef, ensemble: EnsembleSettings, out_dir: Path
) -> ModelRef:
    """Weigh the members (equally, or by validation log-loss) and write the ensemble's folder."""
    log = run_logger(__name__)
    if ensemble.weights == "validation":
        probabilities = [validation_probabilities(member, dataset) for member in members]
        weights = fit_weights([p for p, _ in probabilities], probabilities[0][1])
    else:
        weights = [1.0 / len(members)] * len(members)
    log.info("ensemble of %s, weights %s", ", ".join(m.name for m in members), ", ".join(f"{w:.2f}" for w in weights))
    write_fused(
        out_dir,
        ENSEMBLE,
        [Path(member.path) for member in members],
        {"weights": weights, "member_names": [member.name for member in members], "weighting": ensemble.weights},
        {"candidate": ENSEMBLE_NAME, "train_seconds": sum(member.train_seconds for member in members)},
    )
    return ModelRef(
        name=ENSEMBLE_NAME,
        path=str(out_dir),
        fingerprint=path_fingerprint(out_dir),
        train_seconds=sum(member.train_seconds for member in members),  # what its members cost to train
    )


@task(name="ensemble", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def build_ensemble(members: list[ModelRef], dataset: DatasetRef, ensemble: EnsembleSettings) -> ModelRef:
    """The ensemble candidate of ``members``; cached on the members, the validation data and the settings."""
    require_shared(*members, dataset)
    target = step_dir(
        models_dir(dataset),
        ENSEMBLE_NAME,
        build_ensemble,
        [member.fingerprint for member in members],
        dataset.fingerprint,
        ensemble,
    )
    return finish_atomically(lambda out: build_ensemble_model(members, dataset, ensemble, out), target)


def models_dir(dataset: DatasetRef) -> Path:
    """Where the run's candidate folders live (beside the trained ones)."""
    return settings.runs_dir() / dataset.domain / "models"
