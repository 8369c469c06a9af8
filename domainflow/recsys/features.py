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
* ``year_gap`` — |candidate year − median year of the recent history| in decades.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from domainflow.recsys.baselines import fold_in

FEATURES = ("text", "log_popularity", "bpr", "cooc_recent", "cooc_history", "genre_match", "year_gap")
RECENT = 5


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

    @property
    def num_items(self) -> int:
        return len(self.popularity)

    def save(self, path: Path) -> None:
        """One safetensors file (no pickles); ``fold_in_reg`` is kept as a one-element array."""
        from safetensors.numpy import save_file

        arrays = {
            f.name: np.ascontiguousarray(np.asarray(getattr(self, f.name), dtype=np.float32))
            for f in fields(self)
            if f.name != "fold_in_reg"
        }
        arrays["fold_in_reg"] = np.array([self.fold_in_reg], dtype=np.float64)
        save_file(arrays, str(path))

    @classmethod
    def load(cls, path: Path) -> ItemTables:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        reg = float(arrays.pop("fold_in_reg")[0])
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


def history_features(
    tables: ItemTables, history: Sequence[int], user_embedding: np.ndarray, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Features (rows: candidates, default every item; columns: :data:`FEATURES`) for one history."""
    items = np.arange(tables.num_items) if candidates is None else np.asarray(candidates)
    history = list(history)
    recent = history[-RECENT:]
    out = np.zeros((len(items), len(FEATURES)), dtype=np.float64)
    out[:, 0] = tables.item_embeddings[items] @ user_embedding
    out[:, 1] = np.log1p(tables.popularity[items])
    if history:
        user = fold_in(tables.bpr_items.astype(np.float64), history, tables.fold_in_reg)
        out[:, 2] = tables.bpr_items[items] @ user + tables.bpr_bias[items]
        out[:, 3] = tables.cooccurrence[recent][:, items].mean(axis=0)
        out[:, 4] = tables.cooccurrence[history][:, items].mean(axis=0)
        profile = tables.genres[recent].sum(axis=0)
        item_genres = tables.genres[items]
        denominator = np.linalg.norm(item_genres, axis=1) * np.linalg.norm(profile)
        out[:, 5] = np.divide(item_genres @ profile, denominator, out=np.zeros(len(items)), where=denominator > 0)
        years = tables.years[recent]
        if np.isfinite(years).any():
            gap = np.abs(tables.years[items] - np.nanmedian(years)) / 10.0
            out[:, 6] = np.where(np.isfinite(gap), gap, 0.0)
    return out
