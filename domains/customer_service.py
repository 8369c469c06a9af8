"""customer_service: route banking customer messages to one of 77 intents (Banking77).

The answer policy, in order:

1. a prediction at or above ``CONFIDENCE_THRESHOLD`` gets the intent's reply template;
2. an unsure one looks up the nearest known question (a training message whose intent we
   know); when it is close enough — a similarity threshold calibrated per model so that such
   answers are right at least ``target_precision`` of the time — that question's reply is sent;
3. otherwise the message is escalated to a human agent, with the nearest known question as a hint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from domainflow import settings
from domains.base import DataSource, DomainSpec, QualityGates, RetrievalFallback, TrainingDefaults, register
from domains.customer_service_replies import REPLY_TEMPLATES

if TYPE_CHECKING:
    from domainflow.retrieval import Nearest

CONFIDENCE_THRESHOLD = 0.5
ESCALATION_REPLY = "I want to get this right for you, so I'm passing your message to a colleague who will reply shortly."


def _banking77_labels() -> tuple[str, ...]:
    with open(settings.PROJECT_ROOT / "data" / "banking77" / "categories.json") as handle:
        return tuple(json.load(handle))


@dataclass(frozen=True)
class CustomerServiceSpec(DomainSpec):
    """Intent classification plus the reply / escalation policy."""

    confidence_threshold: float = CONFIDENCE_THRESHOLD

    def respond(self, label: str, score: float, nearest: Nearest | None = None) -> dict[str, Any]:
        if score >= self.confidence_threshold:
            return {"action": "reply", "reply": REPLY_TEMPLATES[label]}
        if nearest is not None and nearest.close_enough:
            return {"action": "reply_from_similar_question", "reply": REPLY_TEMPLATES[nearest.label], "nearest_question": nearest.as_dict()}
        answer: dict[str, Any] = {"action": "escalate", "reply": ESCALATION_REPLY}
        if nearest is not None:
            answer["nearest_question"] = nearest.as_dict()  # a hint for the agent who picks it up
        return answer


SPEC = register(
    CustomerServiceSpec(
        name="customer_service",
        description="Banking customer-service intent classification (Banking77, 77 intents).",
        source=DataSource(
            train="banking77/train.csv",
            test="banking77/test.csv",
            hf_dataset="PolyAI/banking77",
            hf_column_map={"label": "category"},
            licence="CC BY 4.0",
            attribution='Casanueva et al. (2020), "Efficient Intent Detection with Dual Sentence Encoders", PolyAI.',
        ),
        text_column="text",
        label_column="category",
        label_names=_banking77_labels(),
        primary_metric="accuracy",
        metrics=("accuracy", "macro_f1"),
        gates=QualityGates(min_metrics={"accuracy": 0.90, "macro_f1": 0.90}),
        training=TrainingDefaults(epochs=4.0),
        retrieval=RetrievalFallback(consult_below=CONFIDENCE_THRESHOLD, target_precision=0.9),
        max_length=64,  # Banking77 averages 15 tokens; the longest are well under 64
        validation_fraction=0.1,
        min_examples_per_class=5,
    )
)
