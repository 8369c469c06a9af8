"""Evaluation: quality and size of one candidate, written to a report folder.

Quality is computed with the project's own ``evaluate`` modules (offline), on the
test split (for the gate and the report) and the validation split (for choosing
between candidates without peeking at test). The report folder holds
``metrics.json``, ``per_class.csv`` and ``confusion_matrix.png``; speed is measured
afterwards for all candidates side by side (``tasks/speed.py``), and the model card
is written once both are known (``tasks/report.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task

from domainflow import settings
from domainflow.footprint import training_figures
from domainflow.fusion import CascadeClassifier, EnsembleClassifier, FusedClassifier, cascade_curve, leaf_models
from domainflow.logs import run_logger
from domainflow.metrics import compute_metrics
from domainflow.modeling import (
    LoadedClassifier,
    count_parameters,
    directory_size,
    load_classifier,
    predict_proba,
)
from domainflow.onnxrt import OnnxClassifier
from domainflow.outofscope import (
    DISTANCE_KINDS,
    ClassStatistics,
    ModelOutputs,
    OutOfScopeDetector,
    eval_texts,
    in_scope_columns,
    measure_detector,
    model_outputs,
)
from domainflow.records import DatasetRef, Evaluation, ModelRef
from domainflow.retrieval import QuestionIndex, build_index, fallback_policy
from domainflow.spec import EvaluationSlice, OutOfScopeDetection, RetrievalFallback
from tasks.artifacts import artifact_key, png_data_uri
from tasks.caching import CODE_AND_INPUTS, require_shared, step_dir

# The candidate's known-question index and out-of-scope detector, inside its report folder (deploy ships the
# folder's files with the model).
RETRIEVAL_DIR = "retrieval"


def weights_bytes(model: torch.nn.Module | OnnxClassifier | FusedClassifier) -> int:
    """Bytes of the weights as held for inference; dynamically quantized layers count their int8 weights,
    an ONNX graph the tensors stored in it, a fused model (ensemble, cascade) all of its members'."""
    if isinstance(model, EnsembleClassifier | CascadeClassifier):
        return sum(weights_bytes(leaf) for leaf in leaf_models(model))
    if isinstance(model, OnnxClassifier):
        return model.initializer_stats()[1]
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():
        if getattr(module, "_packed_params", None) is not None and callable(getattr(module, "weight", None)):
            quantized: Any = module  # a dynamically quantized layer: weight() and bias() are methods
            weight, bias = quantized.weight(), quantized.bias()
            total += weight.numel() * weight.element_size() + (
                bias.numel() * bias.element_size() if bias is not None else 0
            )
    return total


def zero_fraction(model: torch.nn.Module | OnnxClassifier | FusedClassifier) -> float:
    """Share of exactly-zero weights in the encoder's Linear layers (what unstructured pruning leaves);
    0 for an ONNX graph (only unpruned models are exported, and int8 rounding is not pruning) and a fused model
    (its members are measured as candidates of their own)."""
    from domainflow.compression import encoder_linears

    if isinstance(model, OnnxClassifier | EnsembleClassifier | CascadeClassifier):
        return 0.0
    layers = [m for _, m in encoder_linears(model) if isinstance(getattr(m, "weight", None), torch.Tensor)]
    total = sum(m.weight.numel() for m in layers)
    return sum(int((m.weight == 0).sum()) for m in layers) / total if total else 0.0


def per_class_report(
    spec_labels: Sequence[str], predictions: np.ndarray, references: np.ndarray
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per label (rows for labels with support or predictions)."""
    rows = []
    for index, name in enumerate(spec_labels):
        predicted = int(np.sum(predictions == index))
        support = int(np.sum(references == index))
        if predicted == 0 and support == 0:
            continue
        hits = int(np.sum((predictions == index) & (references == index)))
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "label": name,
                "precision": round(precision, 4),
                "recall": round(recall, 4),
                "f1": round(f1, 4),
                "support": support,
            }
        )
    return rows


def plot_confusion_matrix(
    label_names: Sequence[str], predictions: np.ndarray, references: np.ndarray, path: Path, title: str
) -> Path:
    """Row-normalised confusion matrix as a PNG (readable up to ~100 labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(label_names)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (references, predictions), 1)
    matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, min(16.0, 0.18 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    font = 9 if n <= 10 else max(3, int(220 / n))
    ax.set_xticks(range(n), labels=label_names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=label_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cascade_test_curve(
    loaded: LoadedClassifier, cascade: CascadeClassifier, texts: list[str], labels: np.ndarray, metrics: Sequence[str]
) -> list[dict[str, float]]:
    """The cascade's test accuracy and share passed on over a range of thresholds (the report draws it against
    speed): both members read every test text once more, so each point is what the cascade would answer there."""
    fast, strong = (
        predict_proba(replace(loaded, model=member), texts).numpy() for member in (cascade.fast, cascade.strong)
    )
    return cascade_curve(fast, strong, labels, metrics)


def evaluate_candidate(candidate: ModelRef, dataset: DatasetRef, spec: EvaluationSlice, out_dir: Path) -> Evaluation:
    """Measure one candidate and write its report folder (pure: no Prefect needed)."""
    from datasets import load_from_disk

    log = run_logger(__name__)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_from_disk(dataset.path)
    loaded = load_classifier(candidate.path)

    results: dict[str, Any] = {}
    predictions: dict[str, np.ndarray] = {}
    outputs: dict[str, ModelOutputs] = {}
    detection = spec.out_of_scope
    with_embeddings = detection is not None and detection.score in DISTANCE_KINDS
    cascade = loaded.model if isinstance(loaded.model, CascadeClassifier) else None
    for split in ("test", "validation"):
        texts = list(splits[split]["text"])
        references = np.asarray(splits[split]["label"])
        if cascade is not None:
            cascade.reset_counts()
        outputs[split] = model_outputs(loaded, texts, with_embeddings=with_embeddings)
        if cascade is not None and split == "test":  # what the cascade really passed on, as it ran
            fusion = {key: value for key, value in loaded.metadata["fusion"].items() if key != "members"}
            results["fusion"] = {**fusion, "test_passed_on": cascade.share_passed_on()}
            results["fusion"]["curve"] = cascade_test_curve(loaded, cascade, texts, references, spec.metrics)
        predictions[split] = outputs[split].logits.argmax(dim=1).numpy()
        results[split] = compute_metrics(spec.metrics, predictions[split], references)
    probabilities = {split: split_outputs.probabilities for split, split_outputs in outputs.items()}
    index = None
    if spec.retrieval is not None:
        index = build_retrieval_index(spec.retrieval, loaded, splits, probabilities)
        index.save(out_dir / RETRIEVAL_DIR)
    flagged = None
    if detection is not None:
        detector = build_detector(detection, loaded, splits, outputs, index)
        detector.save(out_dir / RETRIEVAL_DIR)
        flagged = detector.flags(outputs["test"])[0]
        results["out_of_scope"] = measure_out_of_scope(detector, detection, loaded, splits, outputs["test"])
        log.info(
            "%s: out-of-scope detection (%s) on test %s",
            candidate.name,
            detection.score,
            ", ".join(f"{k}={v:.4f}" for k, v in results["out_of_scope"].items()),
        )
    if spec.retrieval is not None and index is not None:
        results["answer_policy"] = fallback_policy(
            index,
            loaded,
            list(splits["test"]["text"]),
            probabilities["test"],
            list(splits["test"]["label"]),
            spec.retrieval.consult_below,
            flagged=flagged,
        )
        log.info(
            "%s: answer policy on test %s",
            candidate.name,
            ", ".join(f"{k}={v:.3f}" for k, v in results["answer_policy"].items()),
        )
    test_labels = np.asarray(splits["test"]["label"])
    results["parameters"] = count_parameters(loaded.model)
    results["size_bytes"] = weights_bytes(loaded.model)
    results["disk_bytes"] = directory_size(candidate.path)
    results["zero_fraction"] = zero_fraction(loaded.model)
    results["training"] = training_figures(loaded.metadata)
    results["per_class"] = per_class_report(dataset.label_names, predictions["test"], test_labels)
    results["candidate"] = candidate.model_dump()

    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    _write_csv(out_dir / "per_class.csv", results["per_class"])
    plot_confusion_matrix(
        dataset.label_names,
        predictions["test"],
        test_labels,
        out_dir / "confusion_matrix.png",
        f"{dataset.domain}: {candidate.name} (test)",
    )
    log.info("%s: test %s", candidate.name, ", ".join(f"{k}={v:.4f}" for k, v in results["test"].items()))
    return Evaluation(
        candidate=candidate,
        test_metrics=results["test"],
        validation_metrics=results["validation"],
        parameters=results["parameters"],
        size_bytes=results["size_bytes"],
        disk_bytes=results["disk_bytes"],
        zero_fraction=results["zero_fraction"],
        report_dir=str(out_dir),
        answer_policy=results.get("answer_policy", {}),
        out_of_scope=results.get("out_of_scope", {}),
        fusion=results.get("fusion", {}),
        training=results["training"],
    )


def build_retrieval_index(
    fallback: RetrievalFallback, loaded: LoadedClassifier, splits: Any, probabilities: dict[str, torch.Tensor]
) -> QuestionIndex:
    """Index the training texts as known questions and calibrate on the unsure validation texts."""
    unsure = np.nonzero((probabilities["validation"].max(dim=1).values < fallback.consult_below).numpy())[0].tolist()
    validation = splits["validation"].select(unsure)
    return build_index(
        loaded,
        list(splits["train"]["text"]),
        list(splits["train"]["label"]),
        list(validation["text"]),
        list(validation["label"]),
        target_precision=fallback.target_precision,
    )


def build_detector(
    detection: OutOfScopeDetection,
    loaded: LoadedClassifier,
    splits: Any,
    outputs: dict[str, ModelOutputs],
    index: QuestionIndex | None,
) -> OutOfScopeDetector:
    """The candidate's out-of-scope detector: class centroids from the training texts (the retrieval index's
    embeddings when there is one: the same unit-length vectors, so not computed twice), the threshold
    calibrated on the validation split."""
    names = loaded.label_names
    label_index = names.index(detection.label) if detection.label in names else None
    statistics = None
    if detection.score in DISTANCE_KINDS:
        train_texts, train_labels = list(splits["train"]["text"]), list(splits["train"]["label"])
        if index is not None and index.questions == train_texts:
            unit = index.embeddings
        else:
            unit = model_outputs(loaded, train_texts, with_embeddings=True).unit_embeddings()
        statistics = ClassStatistics.fit(unit, train_labels, in_scope_columns(len(names), label_index))
    return OutOfScopeDetector.calibrated(
        detection.score,
        outputs["validation"],
        list(splits["validation"]["label"]),
        detection.max_in_scope_cost,
        statistics=statistics,
        label_index=label_index,
    )


def measure_out_of_scope(
    detector: OutOfScopeDetector,
    detection: OutOfScopeDetection,
    loaded: LoadedClassifier,
    splits: Any,
    test: ModelOutputs,
) -> dict[str, float]:
    """The detector on the test split (in scope, plus texts of the domain's out-of-scope label) and on the
    domain's out-of-scope eval files: accuracy cost, false alarms, recall per source, AUROC."""
    out_of_scope = {
        name: model_outputs(loaded, texts, with_embeddings=detector.needs_embeddings)
        for name, texts in eval_texts(detection.eval_files, detection.eval_sample).items()
    }
    return measure_detector(detector, test, list(splits["test"]["label"]), out_of_scope)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def publish_evaluation_artifacts(evaluation: Evaluation, domain: str) -> None:
    """The report as Prefect artifacts: per-class table, confusion matrix, link to the folder."""
    from prefect.artifacts import (
        create_image_artifact,
        create_link_artifact,
        create_table_artifact,
    )

    report = Path(evaluation.report_dir)
    key = artifact_key(domain, evaluation.candidate.name)
    per_class = json.loads((report / "metrics.json").read_text())["per_class"]
    create_table_artifact(
        per_class, key=f"{key}-per-class", description=f"Per-class test report of {evaluation.candidate.name}"
    )
    create_image_artifact(
        png_data_uri(report / "confusion_matrix.png"),
        key=f"{key}-confusion-matrix",
        description=f"Confusion matrix of {evaluation.candidate.name} (test)",
    )
    create_link_artifact(report.as_uri(), link_text=str(report), key=f"{key}-report", description="Report folder")


@task(name="evaluate", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def evaluate(candidate: ModelRef, dataset: DatasetRef, spec: EvaluationSlice) -> Evaluation:
    """Quality and size of a candidate on the dataset's test and validation splits; cached on both fingerprints
    and on the metrics and retrieval settings asked for."""
    require_shared(candidate, dataset)
    out_dir = step_dir(
        settings.runs_dir() / dataset.domain / "reports",
        candidate.name,
        evaluate,
        candidate.fingerprint,
        dataset.fingerprint,
        spec,
    )
    evaluation = evaluate_candidate(candidate, dataset, spec, out_dir)
    publish_evaluation_artifacts(evaluation, dataset.domain)
    return evaluation
