"""The ranker's features of (history, candidate item), from per-item tables stored with the model.

Every feature is computed from a history of item positions (oldest first) and, for the text
score, the user-tower embedding of that history: no ratings and no user id, because serving
receives exactly that. A history given as free text (no catalogue items) still has a text score
and popularity; its id-based features are 0.

Features (in :data:`FEATURES` order):

* ``text`` — cosine of the user-tower and item-tower embeddings (the two-tower model);
* ``log_popularity`` — log(1 + train positives of the item);
* ``bpr`` — BPR matrix factorisation with the history folded in (ridge regression, see
  :func:`domainflow.recsys.baselines.fold_in`): the collaborative signal for any history;
* ``cooc_recent`` / ``cooc_history`` — mean cosine co-occurrence (users who interacted with both
  items) of the candidate with the last :data:`RECENT` history items / with all of them;
* ``genre_match`` — cosine of the candidate's genres with the genre profile of the recent history;
* ``year_gap`` — |candidate year − median year of the recent history| in decades;
* ``next_recent`` / ``next_last`` — what users watched *next* (:func:`transition_probabilities`): the
  probability that the candidate follows each of the last :data:`RECENT` history items within
  :data:`TRANSITION_WINDOW` steps, averaged with weights 0.8 ** k (the most recent item first;
  :func:`~domainflow.recsys.baselines.next_item_scores`) / that it is the very next item after the last one.
  Co-occurrence ignores order; these read the direction and the distance of the sequence, the signal the
  sequential peers (GRU4Rec, SASRec) live on.

Cold-start protocol (:data:`COLD_FEATURES`, used by a ranker fitted under it): a *cold* item
(``ItemTables.cold``) has no collaborative data, so its popularity, BPR and co-occurrence features
are 0 rather than noise (BPR factors of an item with no positives are their random start), and cold
items in the history are left out of those features (they still count in the text, genres and
year). ``cold`` flags the candidate and ``text_cold`` = text score × cold lets the ranker weigh the
text model differently where it is the only signal. Under the standard protocol ``cold`` is all 0,
so these rules change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from domainflow.recsys.baselines import fold_in, next_item_scores

FEATURES = (
    "text",
    "log_popularity",
    "bpr",
    "cooc_recent",
    "cooc_history",
    "genre_match",
    "year_gap",
    "next_recent",
    "next_last",
)
COLD_FEATURES = ("cold", "text_cold")
ALL_FEATURES = FEATURES + COLD_FEATURES
COLLABORATIVE = ("log_popularity", "bpr", "cooc_recent", "cooc_history", "next_recent", "next_last")
SEQUENTIAL = ("next_recent", "next_last")  # need ItemTables.transitions / .successors (absent from older bundles)
RECENT = 5
# Chosen on validation NDCG@10 of the feature alone (standard split; windows 1/3/5/10/20, decays 0.5–1.0 tried:
# 0.116–0.130, these 0.130): a successor g steps later counts TRANSITION_DECAY ** (g - 1).
TRANSITION_WINDOW = 10
TRANSITION_DECAY = 0.8


def feature_names(cold_start: bool) -> tuple[str, ...]:
    """The ranker's features under a protocol: the cold-start ranker also reads the cold flags."""
    return ALL_FEATURES if cold_start else FEATURES


@dataclass
class ItemTables:
    """Per-item arrays (catalogue order) that scoring needs besides the user tower."""

    item_embeddings: np.ndarray  # items x d, L2-normalised (item tower, precomputed)
    popularity: np.ndarray  # items: positives in the data the tables were built from
    bpr_items: np.ndarray  # items x k
    bpr_bias: np.ndarray  # items
    cooccurrence: np.ndarray  # items x items, cosine, zero diagonal
    genres: np.ndarray  # items x genres, 0/1
    years: np.ndarray  # items, NaN when unknown
    fold_in_reg: float = 1.0
    cold: np.ndarray | None = None  # items: 1 where the item has no collaborative data (cold start); default 0
    transitions: np.ndarray | None = None  # items x items: P(j within TRANSITION_WINDOW steps after i), decayed
    successors: np.ndarray | None = None  # items x items: P(j is the very next item after i)

    def __post_init__(self) -> None:
        if self.cold is None:
            self.cold = np.zeros(len(self.popularity), dtype=np.float32)

    def with_cold(self, items: np.ndarray) -> ItemTables:
        """A copy that also treats ``items`` (positions) as cold: how the ranker's fit rows simulate cold
        items among warm ones (see ``tasks.rank_train.fit_features``)."""
        cold = np.array(self.cold, dtype=np.float32, copy=True)
        cold[np.asarray(items, dtype=np.int64)] = 1.0
        return replace(self, cold=cold)

    @property
    def has_transitions(self) -> bool:
        """Whether the sequential features can be computed (bundles written before they existed have no tables)."""
        return self.transitions is not None and self.successors is not None

    @property
    def num_items(self) -> int:
        return len(self.popularity)

    def save(self, path: Path) -> None:
        """One safetensors file (no pickles); ``fold_in_reg`` is kept as a one-element array."""
        from safetensors.numpy import save_file

        arrays = {
            f.name: np.ascontiguousarray(np.asarray(getattr(self, f.name), dtype=np.float32))
            for f in fields(self)
            if f.name != "fold_in_reg" and getattr(self, f.name) is not None
        }
        arrays["fold_in_reg"] = np.array([self.fold_in_reg], dtype=np.float64)
        save_file(arrays, str(path))

    @classmethod
    def load(cls, path: Path) -> ItemTables:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        reg = float(arrays.pop("fold_in_reg")[0])
        # a bundle written before ``cold`` existed loads with none cold; one written before the sequential
        # tables loads without them (its ranker does not read them; one that does is refused at load)
        return cls(**arrays, fold_in_reg=reg)


def cooccurrence_cosine(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> np.ndarray:
    """Item-item cosine similarity of their user sets (float32, zero diagonal)."""
    matrix = np.zeros((num_users, num_items), dtype=np.float32)
    matrix[users, items] = 1.0
    counts = matrix.T @ matrix
    norms = np.sqrt(np.diag(counts)).clip(min=1e-6)
    similarity = counts / norms[:, None] / norms[None, :]
    np.fill_diagonal(similarity, 0.0)
    return similarity.astype(np.float32)


def transition_probabilities(
    histories: Sequence[Sequence[int]], num_items: int, window: int = 1, decay: float = 1.0
) -> np.ndarray:
    """items x items (float32): row i is where users went after item i, as a distribution.

    Every ordered pair (i, j) with j ``g`` ≤ ``window`` positions after i in one history adds
    ``decay ** (g - 1)``; rows are normalised to sum to 1 (a row with no successor stays 0). Directed, unlike
    :func:`cooccurrence_cosine`: "users who watched Star Wars watched Empire next" is not symmetric.
    """
    counts = np.zeros((num_items, num_items), dtype=np.float64)
    for history in histories:
        sequence = np.asarray(history, dtype=np.int64)
        for gap in range(1, window + 1):
            if len(sequence) > gap:
                np.add.at(counts, (sequence[:-gap], sequence[gap:]), decay ** (gap - 1))
    np.fill_diagonal(counts, 0.0)  # an item re-watched is not a recommendation of itself
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0).astype(np.float32)


def genre_matrix(genres: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """0/1 items x genres from ``|``-separated genre strings; the genre names in column order."""
    names = sorted({g for text in genres for g in text.split("|") if g})
    column = {name: j for j, name in enumerate(names)}
    matrix = np.zeros((len(genres), max(1, len(names))), dtype=np.float32)
    for i, text in enumerate(genres):
        for g in text.split("|"):
            if g:
                matrix[i, column[g]] = 1.0
    return matrix, names


def parse_years(years: Sequence[str]) -> np.ndarray:
    out = np.full(len(years), np.nan, dtype=np.float32)
    for i, year in enumerate(years):
        text = str(year).strip()[:4]
        if text.isdigit():
            out[i] = float(text)
    return out


def warm_history(history: Sequence[int], cold: np.ndarray) -> list[int]:
    """The items of ``history`` that collaborative signals know (not cold): BPR never trained a cold item's factors
    and co-occurrence has no row for it. The ranker's features and the gate's collaborative baselines both read a
    history through this, so the baselines stay the ranker's own features, alone."""
    return [item for item in history if not cold[item]]


def history_features(
    tables: ItemTables,
    history: Sequence[int],
    user_embedding: np.ndarray,
    candidates: np.ndarray | None = None,
    names: Sequence[str] = FEATURES,
) -> np.ndarray:
    """Features (rows: candidates, default every item; columns: ``names``, from :data:`ALL_FEATURES`)
    for one history."""
    items = np.arange(tables.num_items) if candidates is None else np.asarray(candidates)
    assert tables.cold is not None  # set by __post_init__
    cold_flags = np.asarray(tables.cold, dtype=np.float64)
    history = list(history)
    warm = warm_history(history, cold_flags)
    recent = history[-RECENT:]
    columns = {name: np.zeros(len(items), dtype=np.float64) for name in ALL_FEATURES}
    columns["text"] = (tables.item_embeddings[items] @ user_embedding).astype(np.float64)
    columns["log_popularity"] = np.log1p(tables.popularity[items])
    if warm:
        user = fold_in(tables.bpr_items.astype(np.float64), warm, tables.fold_in_reg)
        columns["bpr"] = tables.bpr_items[items] @ user + tables.bpr_bias[items]
        columns["cooc_recent"] = tables.cooccurrence[warm[-RECENT:]][:, items].mean(axis=0)
        columns["cooc_history"] = tables.cooccurrence[warm][:, items].mean(axis=0)
        if tables.transitions is not None and tables.successors is not None:  # has_transitions, for mypy
            columns["next_recent"] = next_item_scores(tables.transitions, warm, RECENT)[items]
            columns["next_last"] = tables.successors[warm[-1], items].astype(np.float64)
    if history:
        profile = tables.genres[recent].sum(axis=0)
        item_genres = tables.genres[items]
        denominator = np.linalg.norm(item_genres, axis=1) * np.linalg.norm(profile)
        columns["genre_match"] = np.divide(
            item_genres @ profile, denominator, out=np.zeros(len(items)), where=denominator > 0
        )
        years = tables.years[recent]
        if np.isfinite(years).any():
            gap = np.abs(tables.years[items] - np.nanmedian(years)) / 10.0
            columns["year_gap"] = np.where(np.isfinite(gap), gap, 0.0)
    cold = cold_flags[items]
    for name in COLLABORATIVE:
        columns[name] = columns[name] * (1.0 - cold)
    columns["cold"] = cold
    columns["text_cold"] = columns["text"] * cold
    unknown = [name for name in names if name not in columns]
    if unknown:
        raise ValueError(f"unknown ranker feature(s) {unknown}; known: {list(ALL_FEATURES)}")
    missing = [name for name in names if name in SEQUENTIAL and not tables.has_transitions]
    if missing:
        raise ValueError(f"ranker feature(s) {missing} need the item tables' transitions, which this bundle lacks")
    return np.stack([columns[name] for name in names], axis=1)
