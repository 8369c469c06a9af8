"""Out-of-scope detection: "none of my labels" told apart from an unsure in-scope text.

Why a separate score: a softmax always sums to one over the domain's labels, so a greeting
("hello?") still gets some intent, often with a confident-looking probability. What tells
it apart is how far the text lies from everything the model was trained on. Every score here
reads only what the model computes anyway (its logits and its mean-pooled sentence embedding,
one pass), and a higher score means "more out of scope":

* ``mahalanobis``: squared Mahalanobis distance of the unit-length embedding to the nearest
  class centroid, with one covariance shared by all classes (Ledoit-Wolf shrinkage: 384
  dimensions from ~100 texts per class would otherwise give a singular matrix);
* ``cosine``: one minus the cosine similarity to the nearest class centroid;
* ``energy``: minus the logsumexp of the logits (Liu et al. 2020);
* ``max_softmax``: one minus the top-class probability (the classic baseline).

Measured on the customer_service champion (Banking77, benchmarks/out_of_scope.py),
``mahalanobis`` catches the most at the same cost, hence the default (see README).

The threshold is *calibrated* per model on the validation split: the lowest one at which the
flagged texts that the model classifies correctly are at most ``max_in_scope_cost`` of the
in-scope validation texts (the in-scope accuracy the flagging costs). A domain's own
out-of-scope label, when its data has one, is trained like any other class; predicting it
flags the text whatever the score, and its validation texts are left out of the cost.

Stored beside the retrieval index (``out_of_scope.json``, plus ``out_of_scope.safetensors``
for the distance scores' centroids and whitening), so serving loads what evaluation fitted
and recomputes nothing. No pickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from domainflow.modeling import LoadedClassifier, TextClassifier, embedding_size, padded_batches
from domainflow.onnxrt import EMBEDDINGS_NAME, OUTPUT_NAME, OnnxClassifier
from domainflow.spec import OutOfScopeDetection, OutOfScopeScore

DETECTOR_WEIGHTS = "out_of_scope.safetensors"
DETECTOR_METADATA = "out_of_scope.json"
DETECTOR_FILES = (DETECTOR_WEIGHTS, DETECTOR_METADATA)
SCORE_KINDS: tuple[str, ...] = get_args(OutOfScopeScore)  # the domain setting's choices, in one place
DISTANCE_KINDS = frozenset({"mahalanobis", "cosine"})  # these need the embeddings and the class statistics
EVAL_TEXT_COLUMN = "text"


@dataclass(frozen=True)
class ModelOutputs:
    """Logits and (when asked for) the mean-pooled sentence embeddings of some texts, in their order."""

    logits: torch.Tensor
    embeddings: torch.Tensor | None = None

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    def unit_embeddings(self) -> torch.Tensor:
        if self.embeddings is None:
            raise ValueError("these outputs were computed without embeddings")
        return torch.nn.functional.normalize(self.embeddings, dim=-1)


@torch.inference_mode()
def model_outputs(
    loaded: LoadedClassifier, texts: Sequence[str], *, with_embeddings: bool, batch_size: int = 64
) -> ModelOutputs:
    """Logits, and the embeddings when asked, from one forward pass per batch (length-sorted batches).

    Why one pass: the logits are a linear layer over the embedding, so asking for both costs what
    asking for the logits costs; an ONNX graph returns both outputs from one run.
    """
    model = loaded.model
    logits = torch.empty(len(texts), len(loaded.label_names))
    embeddings = torch.empty(len(texts), embedding_size(model)) if with_embeddings else None
    if not texts:
        return ModelOutputs(logits, embeddings)
    if isinstance(model, torch.nn.Module):
        model.eval()
    for index, input_ids, attention_mask in padded_batches(loaded.tokenizer, texts, loaded.max_length, batch_size):
        if embeddings is None:  # what predict_logits does: any model that answers like TextClassifier
            logits[index] = model(input_ids=input_ids, attention_mask=attention_mask)["logits"].float()
            continue
        if isinstance(model, OnnxClassifier):
            feeds = {
                "input_ids": np.asarray(input_ids.numpy(), dtype=np.int64),
                "attention_mask": np.asarray(attention_mask.numpy(), dtype=np.int64),
            }
            batch_logits, pooled = (
                torch.from_numpy(a) for a in model.session.run([OUTPUT_NAME, EMBEDDINGS_NAME], feeds)
            )
        elif isinstance(model, TextClassifier):  # the head is a linear layer over the pooled embedding (eval mode)
            pooled = model.embed(input_ids, attention_mask)
            batch_logits = model.classifier(pooled)
        else:  # another model type: two calls rather than a guess at its internals
            batch_logits = model(input_ids=input_ids, attention_mask=attention_mask)["logits"]
            pooled = model.embed(input_ids, attention_mask)
        logits[index] = batch_logits.float()
        embeddings[index] = pooled.float()
    return ModelOutputs(logits, embeddings)


@dataclass(frozen=True)
class ClassStatistics:
    """Class centroids of unit-length training embeddings, as the distance scores need them.

    ``whitening`` is a square root of the shared precision matrix (P = W Wᵀ), so a Mahalanobis
    distance is a Euclidean one between whitened vectors: one matrix product per text at serving.
    """

    whitening: torch.Tensor  # (D, D)
    whitened_centroids: torch.Tensor  # (K, D)
    unit_centroids: torch.Tensor  # (K, D), each of length 1

    @classmethod
    def fit(cls, unit_embeddings: torch.Tensor, labels: Sequence[int], classes: Sequence[int]) -> ClassStatistics:
        """Centroids of ``classes`` (the in-scope ones) and their shared covariance, from training texts."""
        from sklearn.covariance import ledoit_wolf

        x = unit_embeddings.double().numpy()
        y = np.asarray(labels)
        present = [k for k in classes if np.any(y == k)]
        if not present:
            raise ValueError("no training text of an in-scope class: cannot fit class centroids")
        means = np.stack([x[y == k].mean(axis=0) for k in present])
        rows = np.isin(y, present)
        residuals = x[rows] - means[np.searchsorted(present, y[rows])]
        covariance, _ = ledoit_wolf(residuals, assume_centered=True)
        whitening = np.linalg.cholesky(np.linalg.inv(covariance))
        return cls(
            whitening=torch.from_numpy(whitening).float(),
            whitened_centroids=torch.from_numpy(means @ whitening).float(),
            unit_centroids=torch.nn.functional.normalize(torch.from_numpy(means).float(), dim=-1),
        )

    def mahalanobis(self, unit_embeddings: torch.Tensor) -> torch.Tensor:
        """Squared distance to the nearest centroid."""
        whitened = unit_embeddings.float() @ self.whitening
        return (torch.cdist(whitened, self.whitened_centroids) ** 2).min(dim=1).values

    def cosine(self, unit_embeddings: torch.Tensor) -> torch.Tensor:
        """One minus the similarity to the nearest centroid."""
        return 1.0 - (unit_embeddings.float() @ self.unit_centroids.T).max(dim=1).values

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "whitening": self.whitening.contiguous(),
            "whitened_centroids": self.whitened_centroids.contiguous(),
            "unit_centroids": self.unit_centroids.contiguous(),
        }


def in_scope_columns(num_labels: int, label_index: int | None) -> list[int]:
    """The class ids that are not the domain's out-of-scope label."""
    return [k for k in range(num_labels) if k != label_index]


def in_scope_rows(references: Sequence[int] | np.ndarray, label_index: int | None) -> np.ndarray:
    """Which labelled texts are in scope (all of them, unless the domain has an out-of-scope label)."""
    references = np.asarray(references)
    return references != label_index if label_index is not None else np.ones(len(references), dtype=bool)


def out_of_scope_scores(
    kind: str, outputs: ModelOutputs, statistics: ClassStatistics | None, label_index: int | None = None
) -> np.ndarray:
    """The ``kind`` score of each text (higher: more out of scope).

    The logit scores read the in-scope classes only: a text the model gives to the domain's own
    out-of-scope label is flagged by that prediction, not by the score.
    """
    if kind in DISTANCE_KINDS:
        if statistics is None:
            raise ValueError(f"the {kind} score needs class statistics")
        unit = outputs.unit_embeddings()
        scores = statistics.mahalanobis(unit) if kind == "mahalanobis" else statistics.cosine(unit)
        return scores.double().numpy()
    logits = outputs.logits.double()  # thresholds sit between texts' scores: no float32 rounding on the way
    columns = in_scope_columns(logits.shape[1], label_index)
    if kind == "energy":
        return (-torch.logsumexp(logits[:, columns], dim=1)).numpy()
    if kind == "max_softmax":
        return (1.0 - torch.softmax(logits, dim=1)[:, columns].max(dim=1).values).numpy()
    raise ValueError(f"unknown out-of-scope score {kind!r}; expected one of {', '.join(SCORE_KINDS)}")


def calibrate_threshold(scores: np.ndarray, correct: np.ndarray, max_cost: float) -> float:
    """The lowest threshold (a text is flagged when its score is above it) at which the flagged texts that
    are classified correctly are at most ``max_cost`` of all the texts (in-scope texts only).

    At least one correct text always stays unflagged: a threshold that flags everything would meet
    any cost on a model that is never right, and say nothing.
    """
    scores, correct = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    if scores.shape != correct.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must be one row per text")
    if not correct.any():
        raise ValueError("no correctly classified calibration text: the in-scope cost cannot be calibrated")
    allowed = int(np.floor(max_cost * len(correct) + 1e-9))
    correct_scores = np.sort(scores[correct])[::-1]
    return float(correct_scores[min(allowed, len(correct_scores) - 1)])


@dataclass
class OutOfScopeDetector:
    """A score kind, its calibrated threshold, and what it needs (class statistics, the out-of-scope label)."""

    kind: str
    threshold: float
    statistics: ClassStatistics | None = None
    label_index: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise ValueError(f"unknown out-of-scope score {self.kind!r}; expected one of {', '.join(SCORE_KINDS)}")
        if self.kind in DISTANCE_KINDS and self.statistics is None:
            raise ValueError(f"the {self.kind} score needs class statistics")

    @property
    def needs_embeddings(self) -> bool:
        return self.kind in DISTANCE_KINDS

    def scores(self, outputs: ModelOutputs) -> np.ndarray:
        return out_of_scope_scores(self.kind, outputs, self.statistics, self.label_index)

    def flags(self, outputs: ModelOutputs) -> tuple[np.ndarray, np.ndarray]:
        """(flagged, score) per text: flagged when the score is above the threshold or the model predicts the
        domain's out-of-scope label."""
        scores = self.scores(outputs)
        flagged = scores > self.threshold
        if self.label_index is not None:
            flagged |= outputs.logits.argmax(dim=1).numpy() == self.label_index
        return flagged, scores

    @classmethod
    def calibrated(
        cls,
        kind: str,
        outputs: ModelOutputs,
        labels: Sequence[int],
        max_cost: float,
        *,
        statistics: ClassStatistics | None = None,
        label_index: int | None = None,
    ) -> OutOfScopeDetector:
        """A detector whose threshold is fit on labelled held-out texts (the validation split)."""
        references = np.asarray(labels)
        in_scope = in_scope_rows(references, label_index)
        predicted = outputs.logits.argmax(dim=1).numpy()
        correct = (predicted == references)[in_scope]
        scores = out_of_scope_scores(kind, outputs, statistics, label_index)
        detector = cls(kind, calibrate_threshold(scores[in_scope], correct, max_cost), statistics, label_index)
        flagged, _ = detector.flags(outputs)
        detector.calibration = {
            "max_in_scope_cost": max_cost,
            "validation_texts": int(in_scope.sum()),
            "validation_in_scope_cost": float((flagged[in_scope] & correct).mean()),
            "validation_false_alarm_rate": float(flagged[in_scope].mean()),
        }
        if not in_scope.all():  # the domain's own out-of-scope texts: how many the calibrated detector catches
            detector.calibration["validation_out_of_scope_recall"] = float(flagged[~in_scope].mean())
        return detector

    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.statistics is not None:
            save_file(self.statistics.tensors(), str(out_dir / DETECTOR_WEIGHTS))
        metadata = {
            "kind": self.kind,
            "threshold": self.threshold,
            "label_index": self.label_index,
            "calibration": self.calibration,
        }
        tmp = out_dir / f"{DETECTOR_METADATA}.tmp"
        tmp.write_text(json.dumps(metadata, indent=2))
        os.replace(tmp, out_dir / DETECTOR_METADATA)

    @classmethod
    def load(cls, directory: str | Path) -> OutOfScopeDetector | None:
        """The detector stored in ``directory``, or None when there is none."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / DETECTOR_METADATA).is_file():
            return None
        metadata = json.loads((directory / DETECTOR_METADATA).read_text())
        statistics = None
        if metadata["kind"] in DISTANCE_KINDS:
            if not (directory / DETECTOR_WEIGHTS).is_file():
                raise FileNotFoundError(
                    f"{directory}: {DETECTOR_METADATA} uses the {metadata['kind']} score but {DETECTOR_WEIGHTS} "
                    "is missing"
                )
            statistics = ClassStatistics(**load_file(str(directory / DETECTOR_WEIGHTS)))
        return cls(
            metadata["kind"], float(metadata["threshold"]), statistics, metadata["label_index"], metadata["calibration"]
        )


def check_detector(detector: OutOfScopeDetector, loaded: LoadedClassifier, what: str) -> None:
    """ValueError naming ``what`` unless ``detector`` fits ``loaded`` (its label, its embedding width) and
    scores a warm-up text to a finite number."""
    if detector.label_index is not None and not 0 <= detector.label_index < len(loaded.label_names):
        raise ValueError(f"{what}: the out-of-scope detector names label {detector.label_index}, which the model lacks")
    try:
        outputs = model_outputs(loaded, ["warm-up: is this in scope?"], with_embeddings=detector.needs_embeddings)
        _, scores = detector.flags(outputs)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{what}: the out-of-scope detector cannot score this model's outputs: {exc}") from exc
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: the out-of-scope detector scores a warm-up text as {scores.tolist()}")


def read_out_of_scope_texts(path: str | Path, sample: int, seed: int = 0) -> list[str]:
    """The non-empty texts of an eval file's ``text`` column; a seeded sample of ``sample`` when it has more."""
    from domainflow.data.problems import DataValidationError
    from domainflow.data.tables import read_table

    path = Path(path)
    frame = read_table(path)
    if EVAL_TEXT_COLUMN not in frame.columns:
        raise DataValidationError(
            f"{path.name}: out-of-scope texts need a {EVAL_TEXT_COLUMN!r} column (found {list(frame.columns)}); "
            f"file: {path}"
        )
    texts = [str(text) for text in frame[EVAL_TEXT_COLUMN] if isinstance(text, str) and text.strip()]
    if not texts:
        raise DataValidationError(f"{path.name}: no non-empty text; file: {path}")
    if len(texts) > sample:
        chosen = np.random.default_rng(seed).choice(len(texts), size=sample, replace=False)
        texts = [texts[i] for i in sorted(chosen.tolist())]
    return texts


def source_name(path: str | Path) -> str:
    """How figures name an eval file: its folder and stem (``out_of_scope/chitchat``)."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}"


def eval_texts(paths: Sequence[str | Path], sample: int, seed: int = 0) -> dict[str, list[str]]:
    """The out-of-scope texts of each eval file (a seeded sample of at most ``sample``), by source name."""
    texts: dict[str, list[str]] = {}
    for path in paths:
        name = source_name(path)
        if name in texts:
            raise ValueError(f"two out-of-scope eval files are both named {name!r}: rename one")
        texts[name] = read_out_of_scope_texts(path, sample, seed)
    return texts


def measure_detector(
    detector: OutOfScopeDetector,
    test: ModelOutputs,
    references: Sequence[int],
    out_of_scope: Mapping[str, ModelOutputs],
) -> dict[str, float]:
    """The detector's figures on labelled test texts (in scope, plus any of the domain's out-of-scope label,
    the source ``labelled``) and on unlabelled out-of-scope texts by source: see :func:`detection_figures`."""
    reference_ids = np.asarray(references)
    in_scope = in_scope_rows(reference_ids, detector.label_index)
    correct = (test.logits.argmax(dim=1).numpy() == reference_ids)[in_scope]
    flagged, scores = detector.flags(test)
    blocks = [(flagged, scores, np.where(in_scope, "", "labelled"))]  # each row's source; "" for in scope
    for name, outputs in out_of_scope.items():
        flagged, scores = detector.flags(outputs)
        blocks.append((flagged, scores, np.full(len(flagged), name)))
    source = np.concatenate([block[2] for block in blocks])
    figures = detection_figures(
        np.concatenate([block[0] for block in blocks]),
        np.concatenate([block[1] for block in blocks]),
        source == "",
        correct,
        {name: source == name for name in dict.fromkeys(source.tolist()) if name},
    )
    return {"threshold": detector.threshold, **figures}


def detection_figures(
    flagged: np.ndarray,
    scores: np.ndarray,
    in_scope: np.ndarray,
    correct: np.ndarray,
    sources: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """What a detector does on a test set: in-scope accuracy with and without the flagging, the false alarms,
    and the out-of-scope recall (overall and per source) with the score's AUROC.

    ``in_scope`` marks the in-scope rows, ``correct`` (one per in-scope row) whether the model classifies
    them correctly; ``sources`` maps a name to a mask of out-of-scope rows.
    """
    from sklearn.metrics import roc_auc_score

    in_flagged = flagged[in_scope]
    accuracy = float(correct.mean()) if correct.size else 0.0
    kept = float((correct & ~in_flagged).mean()) if correct.size else 0.0
    figures: dict[str, float] = {
        "in_scope_texts": float(in_scope.sum()),
        "in_scope_accuracy": accuracy,
        "in_scope_accuracy_with_flagging": kept,
        "in_scope_cost": accuracy - kept,
        "false_alarm_rate": float(in_flagged.mean()) if in_flagged.size else 0.0,
    }
    out = ~in_scope
    if out.any():
        figures["out_of_scope_texts"] = float(out.sum())
        figures["out_of_scope_recall"] = float(flagged[out].mean())
        for name, mask in sources.items():
            if mask.any():
                figures[f"out_of_scope_recall/{name}"] = float(flagged[mask].mean())
        if in_scope.any():
            figures["auroc"] = float(roc_auc_score(out, scores))
    return figures


def model_card_lines(figures: Mapping[str, float], detection: OutOfScopeDetection) -> list[str]:
    """The detector's figures on test, for a model card (empty when nothing was measured)."""
    if not figures:
        return []
    lines = [
        f"## Out-of-scope detection on the test set ({detection.score} score, threshold {figures['threshold']:.4g}, "
        f"calibrated on validation for at most {detection.max_in_scope_cost:.1%} in-scope cost)",
        f"- In-scope accuracy {figures['in_scope_accuracy']:.2%} without flagging, "
        f"{figures['in_scope_accuracy_with_flagging']:.2%} with it (cost {figures['in_scope_cost']:.2%}); "
        f"false alarms {figures['false_alarm_rate']:.2%} of in-scope texts",
    ]
    if "out_of_scope_recall" in figures:
        per_source = ", ".join(
            f"{key.split('/', 1)[1]} {value:.1%}"
            for key, value in figures.items()
            if key.startswith("out_of_scope_recall/")
        )
        lines.append(
            f"- Out-of-scope recall {figures['out_of_scope_recall']:.1%} of {int(figures['out_of_scope_texts'])} texts"
            + (f" ({per_source})" if per_source else "")
            + (f"; AUROC {figures['auroc']:.4f}" if "auroc" in figures else "")
        )
    return [*lines, ""]
