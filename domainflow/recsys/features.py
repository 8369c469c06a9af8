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
from scipy import sparse

from domainflow.recsys.baselines import fold_in, next_item_scores, table_rows

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
ITEM_GRAPHS = ("cooccurrence", "transitions", "successors")  # the items x items tables, sparse (CSR)
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
    cooccurrence: sparse.csr_array  # items x items, cosine, zero diagonal (sparse: see ITEM_GRAPHS)
    genres: np.ndarray  # items x genres, 0/1
    years: np.ndarray  # items, NaN when unknown
    fold_in_reg: float = 1.0
    cold: np.ndarray | None = None  # items: 1 where the item has no collaborative data (cold start); default 0
    transitions: sparse.csr_array | None = None  # items x items: P(j within TRANSITION_WINDOW steps after i)
    successors: sparse.csr_array | None = None  # items x items: P(j is the very next item after i)

    def __post_init__(self) -> None:
        if self.cold is None:
            self.cold = np.zeros(len(self.popularity), dtype=np.float32)
        for name in ITEM_GRAPHS:  # a dense table (a bundle written before they were sparse, a test) is kept exact
            table = getattr(self, name)
            if table is not None and not sparse.issparse(table):
                setattr(self, name, sparse.csr_array(np.asarray(table, dtype=np.float32)))

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
        """One safetensors file (no pickles): a sparse table as its CSR arrays (``<name>.data``, ``.indices``,
        ``.indptr``, ``.shape``); ``fold_in_reg`` as a one-element array."""
        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {"fold_in_reg": np.array([self.fold_in_reg], dtype=np.float64)}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "fold_in_reg" or value is None:
                continue
            if f.name in ITEM_GRAPHS:
                arrays.update(
                    {
                        f"{f.name}.data": value.data.astype(np.float32),
                        f"{f.name}.indices": value.indices.astype(np.int32),
                        f"{f.name}.indptr": value.indptr.astype(np.int64),
                        f"{f.name}.shape": np.asarray(value.shape, dtype=np.int64),
                    }
                )
            else:
                arrays[f.name] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        save_file(arrays, str(path))

    @classmethod
    def load(cls, path: Path) -> ItemTables:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        reg = float(arrays.pop("fold_in_reg")[0])
        for name in ITEM_GRAPHS:
            if f"{name}.data" in arrays:
                parts = [arrays.pop(f"{name}.{part}") for part in ("data", "indices", "indptr", "shape")]
                arrays[name] = sparse.csr_array((parts[0], parts[1], parts[2]), shape=tuple(parts[3]))
        # a bundle written before the tables were sparse holds them dense (converted exactly in __post_init__);
        # one written before ``cold`` loads with none cold; one written before the sequential tables loads
        # without them (its ranker does not read them; one that does is refused at load)
        return cls(**arrays, fold_in_reg=reg)


def keep_neighbours(table: sparse.csr_array, neighbours: int | None) -> sparse.csr_array:
    """``table`` with only the ``neighbours`` largest entries of each row (all when None or when a row has
    fewer), explicit zeros dropped. Why a cap: the tables are items x items, and a catalogue of 50,000 items
    would make each one 10 GB dense; with a cap they grow linearly in the catalogue."""
    table = sparse.csr_array(table)
    table.eliminate_zeros()
    if neighbours is None:
        return table
    rows = np.repeat(np.arange(table.shape[0]), np.diff(table.indptr))
    # each row's entries from the largest value down (lexsort is stable: equal values keep column order, so
    # reruns keep the same entries); an entry's place in that order decides whether it is kept
    order = np.lexsort((-table.data, rows))
    place = np.arange(table.nnz) - table.indptr[rows[order]]
    keep = np.zeros(table.nnz, dtype=bool)
    keep[order[place < neighbours]] = True
    rows = rows[keep]
    return sparse.csr_array((table.data[keep], (rows, table.indices[keep])), shape=table.shape)


def cooccurrence_cosine(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, neighbours: int | None = None
) -> sparse.csr_array:
    """Item-item cosine similarity of their user sets (float32, zero diagonal, sparse: pairs no user shares
    are absent; at most ``neighbours`` per item, :func:`keep_neighbours`). Never builds a users x items
    dense matrix."""
    marks = sparse.csr_array(
        (np.ones(len(users), dtype=np.float32), (np.asarray(users), np.asarray(items))), shape=(num_users, num_items)
    )
    marks.sum_duplicates()
    marks.data[:] = 1.0  # a user who interacted twice with an item is one user of it
    counts = (marks.T @ marks).tocoo()  # exact integers in float32 below 2**24 users
    norms = np.sqrt(counts.diagonal()).clip(min=1e-6).astype(np.float32)
    pairs = counts.row != counts.col  # an item is not its own neighbour (zero diagonal)
    rows, columns = counts.row[pairs], counts.col[pairs]
    similarity = counts.data[pairs] / norms[rows] / norms[columns]
    table = sparse.csr_array((similarity.astype(np.float32), (rows, columns)), shape=counts.shape)
    return keep_neighbours(table, neighbours)


def transition_probabilities(
    histories: Sequence[Sequence[int]],
    num_items: int,
    window: int = 1,
    decay: float = 1.0,
    neighbours: int | None = None,
) -> sparse.csr_array:
    """items x items (float32, sparse): row i is where users went after item i, as a distribution.

    Every ordered pair (i, j) with j ``g`` ≤ ``window`` positions after i in one history adds
    ``decay ** (g - 1)``; rows are normalised to sum to 1 (a row with no successor stays empty), then cut to the
    ``neighbours`` most likely successors (:func:`keep_neighbours`: the kept values stay probabilities of the
    whole row). Directed, unlike :func:`cooccurrence_cosine`: "users who watched Star Wars watched Empire next"
    is not symmetric.
    """
    sources, targets, weights = [], [], []
    for history in histories:
        sequence = np.asarray(history, dtype=np.int64)
        for gap in range(1, window + 1):
            if len(sequence) > gap:
                sources.append(sequence[:-gap])
                targets.append(sequence[gap:])
                weights.append(np.full(len(sequence) - gap, decay ** (gap - 1)))
    if not sources:
        return sparse.csr_array((num_items, num_items), dtype=np.float32)
    rows, columns, values = np.concatenate(sources), np.concatenate(targets), np.concatenate(weights)
    repeat = rows == columns  # an item re-watched is not a recommendation of itself
    counts = sparse.csr_array(
        (values[~repeat], (rows[~repeat], columns[~repeat])), shape=(num_items, num_items), dtype=np.float64
    )
    counts.sum_duplicates()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    counts.data /= np.repeat(np.where(totals > 0, totals, 1.0), np.diff(counts.indptr))
    return keep_neighbours(counts.astype(np.float32), neighbours)


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
        columns["cooc_recent"] = table_rows(tables.cooccurrence, warm[-RECENT:])[items]
        columns["cooc_history"] = table_rows(tables.cooccurrence, warm)[items]
        if tables.transitions is not None and tables.successors is not None:  # has_transitions, for mypy
            columns["next_recent"] = next_item_scores(tables.transitions, warm, RECENT)[items]
            columns["next_last"] = table_rows(tables.successors, warm[-1:])[items]
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
