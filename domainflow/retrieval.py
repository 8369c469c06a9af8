"""Retrieval over known questions: the fallback between a confident answer and a human.

When the classifier is unsure, the nearest question we already know the answer to (a
training text, with its label) can still answer — if it is close enough. "Close enough"
is not a constant: similarities depend on the model (an int8 model's embeddings differ
from its fp32 parent's), so the similarity threshold is *calibrated* per model on the
validation split: the lowest similarity at which answers by the nearest known question are
at least ``target_precision`` correct. Where no threshold reaches it, retrieval never answers.

The index belongs to the model that built it (its embedding space): embeddings are those
of the served model itself (mean-pooled, L2-normalised), so serving needs no second model.
Stored as ``retrieval.safetensors`` (embeddings, fp16) + ``retrieval.json`` (questions,
labels, threshold, calibration figures): no pickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainflow.modeling import LoadedClassifier, embed_texts, embedding_size

INDEX_WEIGHTS = "retrieval.safetensors"
INDEX_METADATA = "retrieval.json"
INDEX_FILES = (INDEX_WEIGHTS, INDEX_METADATA)


@dataclass(frozen=True)
class Nearest:
    """The known question nearest to a text, its label, their cosine similarity, and whether that
    is close enough (by the model's calibrated threshold) to answer with the question's label."""

    question: str
    label: str
    similarity: float
    close_enough: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "label": self.label,
            "similarity": round(self.similarity, 4),
            "close_enough": self.close_enough,
        }


def normalized_embeddings(loaded: LoadedClassifier, texts: Sequence[str]) -> torch.Tensor:
    """The model's own sentence embeddings (mean pooling, unit length)."""
    if not texts:
        return torch.empty(0, embedding_size(loaded.model))
    return torch.nn.functional.normalize(embed_texts(loaded.model, loaded.tokenizer, texts, loaded.max_length), dim=-1)


def calibrate_threshold(
    similarities: np.ndarray, correct: np.ndarray, target_precision: float, min_support: int = 10
) -> float | None:
    """Lowest similarity whose answers (all at or above it) are at least ``target_precision`` correct.

    ``min_support`` answers are required so that a threshold is never set by two lucky texts.
    Returns None when no threshold qualifies (retrieval then never answers).
    """
    order = np.argsort(-similarities, kind="stable")
    hits = np.cumsum(correct[order])
    counts = np.arange(1, len(order) + 1)
    precision = hits / counts
    qualified = np.nonzero((precision >= target_precision) & (counts >= min_support))[0]
    if qualified.size == 0:
        return None
    return float(similarities[order][qualified.max()])


class QuestionIndex:
    """Known questions and their embeddings under one model."""

    def __init__(
        self,
        questions: list[str],
        labels: list[str],
        embeddings: torch.Tensor,
        threshold: float | None,
        calibration: dict[str, Any],
    ) -> None:
        if len(questions) != len(labels) or len(questions) != embeddings.shape[0]:
            raise ValueError(
                f"index mismatch: {len(questions)} questions, {len(labels)} labels, {embeddings.shape[0]} embeddings"
            )
        self.questions = questions
        self.labels = labels
        self.embeddings = embeddings.float()
        self.threshold = threshold
        self.calibration = calibration

    def nearest(self, query_embeddings: torch.Tensor) -> list[Nearest]:
        """The nearest known question of each (unit-length) query embedding."""
        if query_embeddings.shape[0] == 0:
            return []
        similarities = query_embeddings.float() @ self.embeddings.T
        best, index = similarities.max(dim=1)
        return [
            Nearest(self.questions[i], self.labels[i], s, self.threshold is not None and s >= self.threshold)
            for s, i in zip(best.tolist(), index.tolist(), strict=True)
        ]

    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.half().contiguous()}, str(out_dir / INDEX_WEIGHTS))
        metadata = {
            "questions": self.questions,
            "labels": self.labels,
            "threshold": self.threshold,
            "calibration": self.calibration,
        }
        tmp = out_dir / f"{INDEX_METADATA}.tmp"
        tmp.write_text(json.dumps(metadata, ensure_ascii=False))
        os.replace(tmp, out_dir / INDEX_METADATA)

    @classmethod
    def load(cls, directory: str | Path) -> QuestionIndex | None:
        """The index stored in ``directory``, or None when there is none."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / INDEX_METADATA).is_file() or not (directory / INDEX_WEIGHTS).is_file():
            return None
        metadata = json.loads((directory / INDEX_METADATA).read_text())
        embeddings = load_file(str(directory / INDEX_WEIGHTS))["embeddings"]
        return cls(
            metadata["questions"],
            metadata["labels"],
            embeddings,
            metadata["threshold"],
            metadata.get("calibration", {}),
        )


def build_index(
    loaded: LoadedClassifier,
    known_texts: Sequence[str],
    known_labels: Sequence[int],
    calibration_texts: Sequence[str],
    calibration_labels: Sequence[int],
    *,
    target_precision: float,
) -> QuestionIndex:
    """Embed the known questions with ``loaded`` and calibrate the threshold on held-out texts.

    The caller passes as calibration texts the held-out texts on which retrieval would be
    consulted (the unsure ones): precision on easy texts says little about the hard ones.
    """
    names = loaded.label_names
    known = normalized_embeddings(loaded, list(known_texts))
    index = QuestionIndex(list(known_texts), [names[i] for i in known_labels], known, None, {})
    nearest = index.nearest(normalized_embeddings(loaded, list(calibration_texts)))
    similarities = np.array([n.similarity for n in nearest])
    correct = np.array([n.label == names[y] for n, y in zip(nearest, calibration_labels, strict=True)])
    index.threshold = calibrate_threshold(similarities, correct, target_precision)
    index.calibration = {
        "target_precision": target_precision,
        "calibration_texts": len(nearest),
        "nearest_accuracy": float(correct.mean()) if len(correct) else None,
    }
    return index


def fallback_policy(
    index: QuestionIndex,
    loaded: LoadedClassifier,
    texts: Sequence[str],
    probabilities: torch.Tensor,
    references: Sequence[int],
    consult_below: float,
    flagged: np.ndarray | None = None,
) -> dict[str, float]:
    """What the answer policy does on labelled texts: answer confidently, answer from the nearest
    known question, or escalate — with how often each happens and how often the answers are right.

    ``escalated_without_retrieval`` is the escalation rate of the classifier alone, so the
    figures show what retrieval buys and what it costs in precision. Texts ``flagged`` out of
    scope (``domainflow.outofscope``) are escalated, never answered, however confident.
    """
    reference_ids = np.asarray(references)
    out_of_scope = np.zeros(len(reference_ids), dtype=bool) if flagged is None else np.asarray(flagged, dtype=bool)
    scores, top = probabilities.max(dim=1)
    confident = (scores >= consult_below).numpy() & ~out_of_scope
    predicted = top.numpy()
    unsure = np.nonzero(~confident & ~out_of_scope)[0]
    nearest = index.nearest(normalized_embeddings(loaded, [texts[int(i)] for i in unsure]))
    retrieved = np.zeros(len(reference_ids), dtype=bool)
    retrieved_correct = np.zeros(len(reference_ids), dtype=bool)
    for row, found in zip(unsure, nearest, strict=True):
        if found.close_enough:
            retrieved[row] = True
            retrieved_correct[row] = found.label == loaded.label_names[reference_ids[row]]
    total = max(len(reference_ids), 1)
    confident_correct = confident & (predicted == reference_ids)
    answered = confident | retrieved
    policy = {
        "answered_confidently": float(confident.sum() / total),
        "confident_accuracy": float(confident_correct.sum() / max(confident.sum(), 1)),
        "answered_by_retrieval": float(retrieved.sum() / total),
        "escalated": float(1.0 - answered.sum() / total),
        "escalated_without_retrieval": float(1.0 - confident.sum() / total),
        "answered_accuracy": float((confident_correct | retrieved_correct).sum() / max(answered.sum(), 1)),
    }
    if retrieved.any():  # no answers, no precision (left out rather than NaN, which JSON cannot hold)
        policy["retrieval_precision"] = float(retrieved_correct.sum() / retrieved.sum())
    if index.threshold is not None:
        policy["similarity_threshold"] = index.threshold
    if flagged is not None:
        policy["escalated_out_of_scope"] = float(out_of_scope.sum() / total)
    return policy
