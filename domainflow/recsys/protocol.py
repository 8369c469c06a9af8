"""The evaluation protocol, declared once and used by every model (baselines included).

* **Implicit feedback**: an interaction is *positive* when ``rating >= positive_threshold``
  (MovieLens: 4 of 5); with ``positive_threshold=None`` (or a file without ratings) every
  interaction is positive.
* **Chronological leave-last-out, per user**: a user's interactions are ordered by
  (timestamp, the item's position in the catalogue file) — a numeric key that breaks the many
  same-second ties in MovieLens deterministically (32% of its users rated their validation and test
  items in the same second). MovieLens's catalogue lists ids 1..1682 in order, so there the key is
  the item id as an integer; ids are never compared as text ("10" < "9").
  The last positive is the *test* item, the second-last positive the *validation* item. *Train*
  holds only the interactions ordered before the validation item, so nothing a model learns from
  happened after what it is asked to predict. Users with fewer than ``min_positives`` positives
  are kept in train but not evaluated.
* **Full ranking over unseen items**: every catalogue item is a candidate except those the user
  interacted with in train (any rating) — and, for test, the validation item too, which is
  history by then. Ties in score are broken by catalogue position (as :func:`recommend` does),
  so a model earns no credit for a tie.
* **Metrics**: HR@10, NDCG@10 and MRR of the held-out item's rank (local ``evaluate`` modules).

A second protocol, **cold start** (:func:`cold_start`), asks where item text matters: a seeded
share of the catalogue, drawn within popularity strata so that cold items are as popular as the
rest, never appears in train (so in no table, model or ranker row built from it); the held-out
items stay as they are, so the validation and test targets that are cold items can be ranked only
from what the catalogue says about them (title, year, genres). Metrics are reported on all targets
and on the cold targets alone (:func:`cold_target_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

RANKING_METRICS = ("hit_rate_at_10", "ndcg_at_10", "mrr")


@dataclass
class Split:
    """Train interactions and one row per evaluated user: its validation and test item."""

    train: pd.DataFrame  # user_id, item_id, rating, timestamp, positive
    holdout: pd.DataFrame  # user_id, valid_item, test_item, valid_timestamp, test_timestamp
    cold_items: list[str] = field(default_factory=list)  # cold-start protocol: items kept out of train


def mark_positive(interactions: pd.DataFrame, positive_threshold: float | None) -> pd.Series:
    """Which interactions count as positive feedback."""
    if positive_threshold is None or interactions["rating"].isna().all():
        return pd.Series(True, index=interactions.index)
    return interactions["rating"] >= positive_threshold


def chronological(interactions: pd.DataFrame, catalogue: Sequence[str]) -> pd.DataFrame:
    """Interactions sorted by (user, timestamp, catalogue position of the item): the protocol's order.

    Why a numeric tie-breaker: many interactions share a second, and which of two same-second items
    is "last" decides the held-out item. Sorting item ids as text would put "10" before "9"; the
    catalogue position is a number, the same for every run on the same files. An item missing from
    the catalogue is a validation bug upstream, so it raises here rather than sorting last.
    """
    position = {item: i for i, item in enumerate(catalogue)}
    key = interactions["item_id"].map(position)
    if key.isna().any():
        missing = sorted(set(interactions.loc[key.isna(), "item_id"]))[:5]
        raise ValueError(f"interactions name items that are not in the catalogue: {missing}")
    ordered = interactions.assign(_item_position=key.astype(np.int64))
    ordered = ordered.sort_values(["user_id", "timestamp", "_item_position"], kind="stable")
    return ordered.drop(columns=["_item_position"])


def leave_last_out(
    interactions: pd.DataFrame, positive_threshold: float | None, min_positives: int = 3, *, catalogue: Sequence[str]
) -> Split:
    """Split clean interactions (see :func:`domainflow.recsys.data.validate`) by the protocol above;
    ``catalogue`` is the item ids in catalogue (items file) order, the tie-breaker of the order."""
    frame = chronological(interactions, catalogue).reset_index(drop=True)
    frame["positive"] = mark_positive(frame, positive_threshold).to_numpy()
    frame["order"] = frame.groupby("user_id").cumcount()
    positives = frame[frame["positive"]]
    counts = positives.groupby("user_id").size()
    evaluated = counts[counts >= min_positives].index
    last_two = positives[positives["user_id"].isin(evaluated)].groupby("user_id").tail(2)
    test = last_two.groupby("user_id").tail(1).set_index("user_id")
    valid = last_two.groupby("user_id").head(1).set_index("user_id")
    holdout = pd.DataFrame(
        {
            "valid_item": valid["item_id"],
            "test_item": test.loc[valid.index, "item_id"],
            "valid_timestamp": valid["timestamp"],
            "test_timestamp": test.loc[valid.index, "timestamp"],
        }
    )
    holdout.index.name = "user_id"
    cut = frame["user_id"].map(valid["order"]).fillna(np.inf)
    train = frame[frame["order"] < cut].drop(columns=["order"]).reset_index(drop=True)
    return Split(train=train, holdout=holdout.reset_index())


def choose_cold_items(
    catalogue: Sequence[str], positive_items: Sequence[str], share: float, seed: int, strata: int = 5
) -> list[str]:
    """A seeded ``share`` of the catalogue, drawn within ``strata`` popularity strata (catalogue order).

    Why stratified: a uniform draw would be mostly the long tail (most items have few positives),
    and a cold item nobody wants is never a target, so the cold-start numbers would rest on a few
    users. Items are ranked by their number of positives (ties by catalogue position), cut into
    equal-size strata, and ``round(share * size)`` items are drawn from each.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"cold_item_share must be between 0 and 1 (exclusive), got {share}")
    counts = pd.Series(list(positive_items), dtype=object).value_counts()
    popularity = np.array([int(counts.get(item, 0)) for item in catalogue])
    order = np.lexsort((np.arange(len(catalogue)), -popularity))  # most popular first, ties by position
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for stratum in np.array_split(order, min(strata, len(order))):
        chosen += rng.choice(stratum, size=int(round(share * len(stratum))), replace=False).tolist()
    return [catalogue[i] for i in sorted(chosen)]


def cold_start(split: Split, cold_items: Sequence[str]) -> Split:
    """``split`` with every train interaction of ``cold_items`` removed (held-out items unchanged).

    A user's earlier interactions with a cold item go too: histories are read from train, and an
    item that is in no training table must not be in the histories the feature models learn from.
    """
    cold = set(cold_items)
    train = split.train[~split.train["item_id"].isin(cold)].reset_index(drop=True)
    return Split(train=train, holdout=split.holdout, cold_items=list(dict.fromkeys(cold_items)))


def cold_target_rows(targets: np.ndarray, cold_mask: np.ndarray) -> np.ndarray:
    """Boolean per row: is its target (an item position) a cold item."""
    return np.asarray(cold_mask, dtype=bool)[np.asarray(targets, dtype=np.int64)]


@dataclass
class Index:
    """Contiguous integer ids: items in catalogue order, users sorted."""

    items: list[str]
    users: list[str]

    def __post_init__(self) -> None:
        self.item_pos = {item: i for i, item in enumerate(self.items)}
        self.user_pos = {user: i for i, user in enumerate(self.users)}


def seen_matrix(split: Split, index: Index, stage: str) -> np.ndarray:
    """Boolean users × items: what is excluded from each user's candidates at ``stage`` (valid/test)."""
    seen = np.zeros((len(index.users), len(index.items)), dtype=bool)
    rows = split.train["user_id"].map(index.user_pos).to_numpy()
    cols = split.train["item_id"].map(index.item_pos).to_numpy()
    seen[rows, cols] = True
    if stage == "test":
        seen[
            split.holdout["user_id"].map(index.user_pos).to_numpy(),
            split.holdout["valid_item"].map(index.item_pos).to_numpy(),
        ] = True
    elif stage != "valid":
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
    return seen


def target_ranks(scores: np.ndarray, targets: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target among its candidates (ties broken by item position).

    ``scores``: rows × items; ``targets``: the target item position per row; ``excluded``:
    rows × items booleans. A target that is excluded is a protocol bug (leakage), so it raises.
    """
    rows = np.arange(len(targets))
    if excluded[rows, targets].any():
        raise AssertionError("a held-out item is among the excluded (seen) items: train and test overlap")
    target_scores = scores[rows, targets][:, None]
    positions = np.arange(scores.shape[1])[None, :]
    ahead = (scores > target_scores) | ((scores == target_scores) & (positions < targets[:, None]))
    ahead &= ~excluded
    return ahead.sum(axis=1) + 1


def ranking_metrics(ranks: Sequence[int] | np.ndarray, names: Sequence[str] = RANKING_METRICS) -> dict[str, float]:
    """The ranking metrics of held-out ranks, through the project's local ``evaluate`` modules."""
    import evaluate

    from domainflow.metrics import load_metric

    combined = evaluate.combine([load_metric(name) for name in names])
    return {key: float(value) for key, value in combined.compute(predictions=[int(r) for r in ranks]).items()}


def evaluate_scores(
    score_fn, split: Split, index: Index, stage: str, names: Sequence[str] = RANKING_METRICS
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of a scorer at ``stage``: ``score_fn(user_positions, stage) -> users × items`` scores."""
    users = split.holdout["user_id"].map(index.user_pos).to_numpy()
    column = "valid_item" if stage == "valid" else "test_item"
    targets = split.holdout[column].map(index.item_pos).to_numpy()
    excluded = seen_matrix(split, index, stage)[users]
    scores = np.asarray(score_fn(users, stage), dtype=np.float64)
    ranks = target_ranks(scores, targets, excluded)
    return ranking_metrics(ranks, names), ranks


def build_index(items: pd.DataFrame, interactions: pd.DataFrame, holdout: pd.DataFrame | None = None) -> Index:
    """Items in catalogue order; users sorted, from train and (cold start: a user may have only cold
    items in train) the held-out rows."""
    users = set(interactions["user_id"].unique())
    if holdout is not None:
        users |= set(holdout["user_id"].unique())
    return Index(items=list(items["item_id"]), users=sorted(users))
