"""Request and response bodies, with the limits that make bad input a 422 instead of a 500.

The request model is built per app from :class:`~serving.config.ServingConfig`, so the limits
appear in the OpenAPI schema (``/docs``) exactly as they are enforced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model

from domainflow.explain import OFFERED_METHODS
from serving.config import ServingConfig


def _check_text(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but no tokenizer can read it
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    return text


def request_model(config: ServingConfig) -> type[BaseModel]:
    """``{"texts": [...], "top_k": 3}`` with this app's limits (unknown fields are refused: a typo
    such as ``"text"`` should say so, not silently classify nothing)."""
    Text = Annotated[StrictStr, Field(min_length=1, max_length=config.max_chars), AfterValidator(_check_text)]
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {"texts": ["I still have not received my new card", "What is the exchange rate today?"], "top_k": 3}
                ]
            },
        ),
        texts=(
            list[Text],
            Field(
                min_length=1,
                max_length=config.max_texts,
                description=f"1 to {config.max_texts} texts of 1 to {config.max_chars} characters.",
            ),
        ),
        top_k=(StrictInt, Field(3, ge=1, le=config.max_top_k, description="How many labels to return per text.")),
    )


def explain_request_model(config: ServingConfig) -> type[BaseModel]:
    """``{"text": "...", "label": "other_label", "method": "occlusion"}``: one text, with predict's limits on it."""
    Text = Annotated[StrictStr, Field(min_length=1, max_length=config.max_chars), AfterValidator(_check_text)]
    methods = Literal[OFFERED_METHODS]  # type: ignore[valid-type]  # the methods that beat random deletion
    return create_model(
        "ExplainRequest",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"text": "my card still has not arrived", "label": "lost_or_stolen_card"}]},
        ),
        text=(Text, Field(description=f"The text to explain (1 to {config.max_chars} characters).")),
        label=(
            StrictStr | None,
            Field(None, description="Another label to explain as well (the predicted one always is)."),
        ),
        method=(
            methods,
            Field(
                "occlusion",
                description="occlusion (leave one word out; explains the served model itself, int8 or not) or "
                "integrated_gradients (captum; only for a champion with fp32 torch weights).",
            ),
        ),
    )


class WordScore(BaseModel):
    word: str
    start: int = Field(description="Character offset of the word in the text.")
    end: int = Field(description="Offset just past the word.")
    score: float = Field(
        description="How much the word raises the predicted label's log-odds (negative: it speaks against it)."
    )
    other_score: float | None = Field(None, description="The same for the requested other label.")


class ExplainResponse(BaseModel):
    domain: str
    version: int = Field(description="Registry version of the model that answered.")
    method: str
    label: str = Field(description="The predicted label.")
    score: float = Field(description="Its probability.")
    other_label: str | None = None
    other_score: float | None = Field(None, description="The other label's probability.")
    words: list[WordScore] = Field(description="The text's words in order, each with its scores.")


class LabelScore(BaseModel):
    label: str
    score: float


class NearestQuestion(BaseModel):
    """The closest known question, when the domain has a retrieval fallback."""

    model_config = ConfigDict(extra="allow")
    question: str
    label: str | None = None
    similarity: float | None = Field(None, description="Cosine similarity of the text to the known question.")
    close_enough: bool | None = Field(
        None, description="Whether it passed the model's calibrated threshold, so its reply was used."
    )


class Prediction(BaseModel):
    label: str = Field(description="The most likely label.")
    score: float = Field(description="Its probability.")
    top_k: list[LabelScore] = Field(description="The best labels, best first.")
    action: str | None = Field(
        None,
        description="What the domain does: for customer_service 'reply', 'reply_from_similar_question' or 'escalate'.",
    )
    reply: str | None = Field(None, description="The reply template, or the escalation message.")
    nearest_question: NearestQuestion | None = None
    out_of_scope: bool | None = Field(
        None,
        description=(
            "For a domain with out-of-scope detection: whether the text belongs to none of its labels "
            "(then it is escalated, never answered)."
        ),
    )
    out_of_scope_score: float | None = Field(
        None, description="The detector's score (higher: further from the labels); flagged above the model's threshold."
    )
    details: dict[str, Any] | None = Field(None, description="Anything else the domain's response carries.")


class PredictResponse(BaseModel):
    domain: str
    version: int = Field(description="Registry version of the model that answered (all texts of a request share it).")
    predictions: list[Prediction]


class DomainStatus(BaseModel):
    domain: str
    description: str
    status: str = Field(
        description="serving | serving_previous (a newer champion failed to load) | no_champion | load_failed"
    )
    version: int | None = Field(description="Version being served.")
    champion_version: int | None = Field(description="Version the registry's champion pointer names.")
    candidate: str | None = None
    loaded_at: str | None = None
    labels: int
    last_error: str | None = None


class DomainsResponse(BaseModel):
    domains: list[DomainStatus]
