"""Request and response bodies, with the limits that make bad input a 422 instead of a 500.

The request model is built per app from :class:`~serving.config.ServingConfig`, so the limits
appear in the OpenAPI schema (``/docs``) exactly as they are enforced.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model

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
