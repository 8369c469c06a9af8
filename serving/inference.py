"""From texts to answers: the batch function the micro-batcher runs, and the domain's reaction.

Split from the HTTP layer so that ``domainflow predict`` and the service can share one notion of
"a prediction": label, score, the top-k labels, and whatever the domain does with it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from domainflow.modeling import predict_proba
from domains.base import DomainSpec
from serving.model_store import DomainSlot, ServedModel


@dataclass(frozen=True)
class TextScores:
    """The best ``k`` labels of one text, best first (k = the most any request may ask for)."""

    labels: tuple[str, ...]
    scores: tuple[float, ...]


class NoModelError(RuntimeError):
    """The domain has no loaded champion (never promoted, or its only champion failed to load)."""


def batch_function(slot: DomainSlot, max_top_k: int) -> Callable[[list[str]], tuple[ServedModel, list[TextScores]]]:
    """What the batcher runs in its worker thread for ``slot``.

    The model is read from the slot once per batch, so a hot swap between two batches is
    invisible inside either: every text of a batch is answered by the same version.
    """

    def run(texts: list[str]) -> tuple[ServedModel, list[TextScores]]:
        served = slot.current
        if served is None:
            raise NoModelError(f"no model loaded for {slot.domain}")
        probabilities = predict_proba(served.loaded, texts, batch_size=max(len(texts), 1))
        k = min(max_top_k, probabilities.shape[1])
        scores, indices = probabilities.topk(k, dim=1)
        names = served.label_names
        return served, [
            TextScores(tuple(names[i] for i in row_indices), tuple(row_scores))
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist())
        ]

    return run


@functools.lru_cache(maxsize=None)
def _respond_takes_text(spec_type: type) -> bool:
    try:
        return "text" in inspect.signature(spec_type.respond).parameters
    except (TypeError, ValueError):
        return False


def domain_response(spec: DomainSpec, text: str, label: str, score: float) -> dict[str, Any]:
    """What the domain does with a prediction (reply, escalation, ...).

    ``spec.respond(label, score)`` is the contract today. A domain with a retrieval fallback needs
    the text itself to find the nearest known question, so a ``respond`` that declares a ``text``
    parameter gets it; the response schema already carries ``nearest_question``.
    """
    if _respond_takes_text(type(spec)):
        return dict(spec.respond(label, score, text=text))  # type: ignore[call-arg]
    return dict(spec.respond(label, score))


def prediction_record(spec: DomainSpec, text: str, scores: TextScores, top_k: int, ndigits: int = 6) -> dict[str, Any]:
    """One text's answer as a plain dict matching :class:`serving.schemas.Prediction`."""
    label, score = scores.labels[0], scores.scores[0]
    record: dict[str, Any] = {
        "label": label,
        "score": round(score, ndigits),
        "top_k": [{"label": l, "score": round(s, ndigits)} for l, s in zip(scores.labels[:top_k], scores.scores[:top_k])],
    }
    response = domain_response(spec, text, label, score)
    for key in ("action", "reply"):
        if key in response:
            record[key] = response.pop(key)
    nearest = response.pop("nearest_question", None)
    if nearest is not None:
        record["nearest_question"] = nearest if isinstance(nearest, dict) else {"question": str(nearest)}
    if response:
        record["details"] = response
    return record
