"""``POST /v1/{domain}/rank`` for ranking domains: a user's history in, the top-k items out.

The request carries a history of catalogue item ids and/or free texts (``"a heist film with a
twist"``), optionally the candidate ids to rank (default: the whole catalogue minus the
history), and ``top_k``. The answer lists items best first with their score and title.

Same conventions as ``/predict``: the API key is checked first (middleware), the body is
validated into a 422 whose message names the field (an empty history, unknown fields, wrong
types, an item id the model does not know), and a missing model is a 503. The champion is
loaded and hot-swapped by the same :class:`serving.model_store.ModelStore`; requests go through
the same admission control as ``/predict`` (a bounded queue, a deadline, see :func:`rank_function`)
and run one at a time on the shared inference thread (one user per request: nothing to batch).

:func:`rank_record` is also what ``domainflow recommend`` prints, so both share one shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from domainflow.recsys.bundle import Recommendation, Recommender, UnknownItemsError
from domainflow.registry import VersionInfo
from serving.config import ServingConfig
from serving.inference import NoModelError
from serving.schemas import _check_text

MAX_HISTORY = 200
MAX_CANDIDATES = 5000
MAX_TOP_K = 100


def rank_request_model(config: ServingConfig) -> type[BaseModel]:
    """The request body, with this app's text limits (unknown fields are refused)."""
    Text = Annotated[StrictStr, Field(min_length=1, max_length=config.max_chars), AfterValidator(_check_text)]
    ItemId = Annotated[StrictStr, Field(min_length=1, max_length=200)]

    class RankRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "examples": [
                    {"history": ["50", "181", "172"], "top_k": 5},
                    {"history_texts": ["a space opera with rebels and an empire"], "top_k": 5},
                ]
            },
        )

        history: list[ItemId] = Field(
            default_factory=list,
            max_length=MAX_HISTORY,
            description="Catalogue item ids the user interacted with, oldest first.",
        )
        history_texts: list[Text] = Field(
            default_factory=list,
            max_length=config.max_texts,
            description="Free texts describing what the user liked; read as the most recent history.",
        )
        candidates: list[ItemId] | None = Field(
            None,
            min_length=1,
            max_length=MAX_CANDIDATES,
            description="Item ids to rank (default: every catalogue item not in the history).",
        )
        top_k: StrictInt = Field(10, ge=1, le=MAX_TOP_K, description="How many items to return.")

        @model_validator(mode="after")
        def _some_history(self) -> RankRequest:
            if not self.history and not self.history_texts:
                raise ValueError(
                    "history is empty: give at least one item id in 'history' or one text in 'history_texts'"
                )
            return self

    return RankRequest


class RankedItem(BaseModel):
    item_id: str
    title: str
    score: float = Field(description="The model's score (higher is better; comparable within one response only).")


class RankResponse(BaseModel):
    domain: str
    version: int = Field(description="Registry version of the model that answered.")
    scorer: str = Field(
        description=(
            "'ranker' (text score + collaborative features) or 'text' "
            "(two-tower cosine: a text-only model, or a history of free texts only)."
        )
    )
    items: list[RankedItem]


def rank_record(
    domain: str, version: int, scorer: str, items: Sequence[Recommendation], ndigits: int = 6
) -> dict[str, Any]:
    """A ranking answer as a plain dict matching :class:`RankResponse`."""
    return {
        "domain": domain,
        "version": version,
        "scorer": scorer,
        "items": [{"item_id": r.item_id, "title": r.title, "score": round(r.score, ndigits)} for r in items],
    }


def load_recommender(slot: Any, info: VersionInfo) -> Any:
    """Load a ranking champion for the model store and check it can answer (blocking: run in a thread)."""
    from serving.model_store import ServedModel

    recommender = Recommender(info.model_dir, slot.spec.history_text)
    warm = recommender.recommend(history=recommender.item_ids[:2], k=3)
    if len(warm) != 3 or not all(item.score == item.score for item in warm):  # NaN != NaN
        raise ValueError(f"{slot.domain} v{info.version}: warm-up ranking did not return 3 finite scores")
    return ServedModel.of(slot.domain, info, recommender)


def rank_function(slot: Any) -> Callable[[list[Any]], tuple[Any, list[dict[str, Any] | UnknownItemsError]]]:
    """What the domain's batcher runs on the inference thread: one ranking request per call.

    Why through a batcher at all (there is nothing to merge): the batcher is the admission control,
    a bounded queue in which a request has a deadline and can be withdrawn, and it puts at most one
    ranking at a time in the shared executor, so a ranking flood cannot starve other domains.
    An unknown item id is the caller's mistake, not the batch's: it comes back as the result (for a
    422), not raised (which would log a traceback). The model is read from the slot per call, as for
    /predict, so a hot swap is never seen half-way.
    """

    def run(bodies: list[Any]) -> tuple[Any, list[dict[str, Any] | UnknownItemsError]]:
        served = slot.current
        if served is None:
            raise NoModelError(f"no model loaded for {slot.domain}")
        recommender: Recommender = served.loaded
        answers: list[dict[str, Any] | UnknownItemsError] = []
        for body in bodies:
            try:
                items = recommender.recommend(
                    history=body.history, texts=body.history_texts, candidates=body.candidates, k=body.top_k
                )
            except UnknownItemsError as exc:
                answers.append(exc)
                continue
            answers.append(rank_record(served.domain, served.version, recommender.scorer_for(body.history), items))
        return served, answers

    return run


def unknown_items_detail(exc: UnknownItemsError) -> dict[str, Any]:
    """The 422 body for ids the model does not know, in the shape of the other validation errors."""
    return {
        "message": str(exc),
        "detail": [{"type": "unknown_item", "loc": ["body", exc.field], "msg": str(exc), "unknown": exc.unknown[:50]}],
    }
