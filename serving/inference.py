"""From texts to answers: the batch function the micro-batcher runs, and the domain's reaction.

Split from the HTTP layer so that ``domainflow predict`` and the service can share one notion of
"a prediction": label, score, the top-k labels, and whatever the domain does with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from domainflow.modeling import LoadedClassifier
from domainflow.outofscope import OutOfScopeDetector, model_outputs
from domainflow.retrieval import Nearest, QuestionIndex, normalized_embeddings
from domainflow.spec import ClassificationSpec
from serving.model_store import DomainSlot, ServedModel


@dataclass(frozen=True)
class TextScores:
    """The best ``k`` labels of one text, best first (k = the most any request may ask for), the
    nearest known question when the domain has a retrieval fallback and the text was unsure, and
    the out-of-scope verdict and score when the model has a detector (None when it has none)."""

    labels: tuple[str, ...]
    scores: tuple[float, ...]
    nearest: Nearest | None = None
    out_of_scope: bool | None = None
    out_of_scope_score: float | None = None


#: Texts per forward pass inside one batch. Why not the whole batch at once: a batch of requests holds texts
#: of every length, and one pass pads all of them to the longest. Sorted by length and cut into passes of 8,
#: the padding goes and so does most of the waste: measured on the int8 customer_service champion, 1,024
#: Banking77 test texts in arrival order, batches of 32 (2 busy cores): ~190-260 texts/s as one pass per batch,
#: ~470-540 in passes of 8 (12: 370-470, 4: 420-690, noisier); one text at a time: ~350.
MODEL_PASS_TEXTS = 8


class NoModelError(RuntimeError):
    """The domain has no loaded champion (never promoted, or its only champion failed to load)."""


def score_texts(
    loaded: LoadedClassifier,
    index: QuestionIndex | None,
    spec: ClassificationSpec,
    texts: list[str],
    max_top_k: int,
    detector: OutOfScopeDetector | None = None,
) -> list[TextScores]:
    """Top-k labels per text; the out-of-scope verdict when there is a ``detector``; for the unsure texts not
    flagged out of scope (under the domain's ``consult_below``), the nearest known question.

    The detector reads the same forward pass (its embeddings come with the logits); retrieval costs a second
    pass over the unsure texts only, which a good model keeps few, and a flagged text never reaches it.
    """
    with_embeddings = detector is not None and detector.needs_embeddings
    outputs = model_outputs(loaded, texts, with_embeddings=with_embeddings, batch_size=MODEL_PASS_TEXTS)
    probabilities = outputs.probabilities
    k = min(max_top_k, probabilities.shape[1])
    scores, indices = probabilities.topk(k, dim=1)
    flagged: list[bool | None] = [None] * len(texts)
    flag_scores: list[float | None] = [None] * len(texts)
    if detector is not None:
        verdicts, values = detector.flags(outputs)
        flagged, flag_scores = [bool(v) for v in verdicts], [float(v) for v in values]
    nearest: dict[int, Nearest] = {}
    if index is not None and spec.retrieval is not None:
        unsure = [
            row
            for row, top in enumerate(scores[:, 0].tolist())
            if top < spec.retrieval.consult_below and not flagged[row]
        ]
        if unsure:
            found = index.nearest(normalized_embeddings(loaded, [texts[row] for row in unsure]))
            nearest = dict(zip(unsure, found, strict=True))
    names = loaded.label_names
    return [
        TextScores(
            tuple(names[i] for i in row_indices), tuple(row_scores), nearest.get(row), flagged[row], flag_scores[row]
        )
        for row, (row_scores, row_indices) in enumerate(zip(scores.tolist(), indices.tolist(), strict=True))
    ]


def batch_function(slot: DomainSlot, max_top_k: int) -> Callable[[list[str]], tuple[ServedModel, list[TextScores]]]:
    """What the batcher runs in its worker thread for ``slot``.

    The model is read from the slot once per batch, so a hot swap between two batches is
    invisible inside either: every text of a batch is answered by the same version.
    """

    def run(texts: list[str]) -> tuple[ServedModel, list[TextScores]]:
        served = slot.current
        if served is None:
            raise NoModelError(f"no model loaded for {slot.domain}")
        spec = slot.spec.as_kind(ClassificationSpec)
        return served, score_texts(served.loaded, served.index, spec, texts, max_top_k, served.out_of_scope)

    return run


def prediction_record(
    spec: ClassificationSpec, text: str, scores: TextScores, top_k: int, ndigits: int = 6
) -> dict[str, Any]:
    """One text's answer as a plain dict matching :class:`serving.schemas.Prediction`.

    A text flagged out of scope is escalated whatever its score (for a domain with replies), without the
    tags of a label it does not belong to; the domain's ``respond`` decides for every other text.
    """
    label, score = scores.labels[0], scores.scores[0]
    record: dict[str, Any] = {
        "label": label,
        "score": round(score, ndigits),
        "top_k": [
            {"label": name, "score": round(s, ndigits)}
            for name, s in zip(scores.labels[:top_k], scores.scores[:top_k], strict=True)
        ],
    }
    if scores.out_of_scope is not None and scores.out_of_scope_score is not None:
        record["out_of_scope"] = scores.out_of_scope
        record["out_of_scope_score"] = round(scores.out_of_scope_score, ndigits)
    if scores.out_of_scope:
        if spec.answers.replies:
            record.update(action="escalate", reply=spec.answers.escalation_reply)
        return record
    response = dict(spec.respond(label, score, nearest=scores.nearest))
    for key in ("action", "reply"):
        if key in response:
            record[key] = response.pop(key)
    nearest = response.pop("nearest_question", None)
    if nearest is not None:
        record["nearest_question"] = nearest if isinstance(nearest, dict) else {"question": str(nearest)}
    if response:
        record["details"] = response
    return record
