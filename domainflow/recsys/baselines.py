"""The honest baselines: most-popular, BPR matrix factorisation (our own short torch implementation),
BPR with the user's whole history folded in, and a training-free item-kNN over the recent history.

All are fitted on the train split only and scored under the same protocol as the text model.
Why four: popularity and BPR are the classic floors, but on MovieLens co-occurrence with the
user's last few films alone is much stronger than both (NDCG@10 ~0.09 vs 0.06), and BPR's trained
user factors never see the validation item while the ranker's history does at test time; the
ranker must beat the strongest simple model given the same history, not only the weakest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from torch import nn

# next_item_scores: the k-th most recent history item weighs RECENCY_DECAY ** k (chosen on validation, with the
# transition window and decay in domainflow.recsys.features)
RECENCY_DECAY = 0.8


def popularity_scores(train_positive_items: np.ndarray, num_items: int) -> np.ndarray:
    """Number of train positives per item (the same list for every user)."""
    return np.bincount(train_positive_items, minlength=num_items).astype(np.float64)


class BPR(nn.Module):
    """score(u, i) = p_u · q_i + b_i, trained with the BPR pairwise loss (Rendle et al., 2009)."""

    def __init__(self, num_users: int, num_items: int, dim: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.user = nn.Parameter(torch.randn(num_users, dim, generator=generator) * 0.1)
        self.item = nn.Parameter(torch.randn(num_items, dim, generator=generator) * 0.1)
        self.bias = nn.Parameter(torch.zeros(num_items))

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.user[users] * self.item[items]).sum(-1) + self.bias[items]

    def all_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.user[users] @ self.item.T + self.bias


@dataclass
class BprResult:
    user_factors: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    best_epoch: int
    best_valid: float
    curve: list[tuple[int, float]]


def train_bpr(
    users: np.ndarray,
    items: np.ndarray,
    num_users: int,
    num_items: int,
    *,
    dim: int,
    epochs: int,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    validate: Callable[[np.ndarray, np.ndarray, np.ndarray], float] | None = None,
    eval_every: int = 5,
    negative_pool: np.ndarray | None = None,
) -> BprResult:
    """Fit BPR on (user, positive item) pairs; one uniformly sampled unobserved item per pair and epoch.

    ``validate(user_factors, item_factors, item_bias) -> NDCG@10`` picks the epoch (early stopping
    on validation, never test); without it the last epoch is kept. ``negative_pool``: the item
    positions negatives are drawn from (default every item); the cold-start protocol passes the warm
    items, so a cold item is not even a negative in training and keeps its random initial factors.
    """
    # Tiny matrices: with 2 threads on a shared 2-core machine each step costs ~35x more than with
    # one (measured: 2 epochs of ML-100K in 9.3 s vs 0.27 s), so BPR trains single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_bpr(
            users,
            items,
            num_users,
            num_items,
            dim=dim,
            epochs=epochs,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
            validate=validate,
            eval_every=eval_every,
            negative_pool=negative_pool,
        )
    finally:
        torch.set_num_threads(threads)


def _train_bpr(
    users: np.ndarray,
    items: np.ndarray,
    num_users: int,
    num_items: int,
    *,
    dim: int,
    epochs: int,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    validate: Callable[[np.ndarray, np.ndarray, np.ndarray], float] | None,
    eval_every: int,
    negative_pool: np.ndarray | None = None,
) -> BprResult:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    users, items = np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)
    model = BPR(num_users, num_items, dim, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    observed = np.zeros((num_users, num_items), dtype=bool)
    observed[users, items] = True
    u_all, i_all = torch.as_tensor(users), torch.as_tensor(items)

    def snapshot() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            model.user.detach().numpy().copy(),
            model.item.detach().numpy().copy(),
            model.bias.detach().numpy().copy(),
        )

    best = snapshot()
    best_epoch, best_valid, curve = epochs, float("-inf"), []
    pool = None if negative_pool is None else np.asarray(negative_pool, dtype=np.int64)

    def draw(size: int) -> np.ndarray:
        if pool is None:
            return rng.integers(0, num_items, size=size)
        return pool[rng.integers(0, len(pool), size=size)]

    for epoch in range(1, epochs + 1):
        negatives = draw(len(users))
        clash = observed[users, negatives]
        while clash.any():  # resample negatives the user actually liked
            negatives[clash] = draw(int(clash.sum()))
            clash = observed[users, negatives]
        order = torch.as_tensor(rng.permutation(len(users)))
        j_all = torch.as_tensor(negatives)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            u, i, j = u_all[batch], i_all[batch], j_all[batch]
            diff = model.score(u, i) - model.score(u, j)
            reg = model.user[u].pow(2).sum() + model.item[i].pow(2).sum() + model.item[j].pow(2).sum()
            loss = -nn.functional.logsigmoid(diff).mean() + weight_decay * reg / len(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if validate is not None and (epoch % eval_every == 0 or epoch == epochs):
            value = validate(*snapshot())
            curve.append((epoch, value))
            if value > best_valid:
                best, best_epoch, best_valid = snapshot(), epoch, value
    if validate is None:
        best = snapshot()
    return BprResult(best[0], best[1], best[2], best_epoch, best_valid, curve)


def fold_in(item_factors: np.ndarray, history: list[int], reg: float) -> np.ndarray:
    """A user vector for a history the model never saw: ridge regression of score 1 on the history's items.

    Why: serving receives arbitrary histories, so the ranker's MF feature is computed this way both
    in evaluation and in serving (the same numbers either way); the MF *baseline* uses the trained
    user factors.
    """
    dim = item_factors.shape[1]
    if not history:
        return np.zeros(dim)
    v = item_factors[history]
    return np.linalg.solve(v.T @ v + reg * np.eye(dim), v.T @ np.ones(len(history)))


def table_rows(table: sparse.csr_array, rows: Sequence[int], weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) mean of some rows of a sparse items x items table, dense over the columns (float64); zeros
    for no rows (an empty history scores nothing, rather than 0/0)."""
    if len(rows) == 0:
        return np.zeros(table.shape[1], dtype=np.float64)
    picked = table[np.asarray(rows, dtype=np.int64)]
    if weights is None:
        weights = np.ones(len(rows))
    return np.asarray(picked.T @ np.asarray(weights, dtype=np.float64)).ravel() / weights.sum()


def table_bytes(table: sparse.csr_array) -> int:
    """Bytes a sparse table holds (values, column indices, row pointers): what a model card reports as size."""
    return int(table.data.nbytes + table.indices.nbytes + table.indptr.nbytes)


def item_knn_scores(cooccurrence: sparse.csr_array, histories: list[list[int]], recent: int) -> np.ndarray:
    """users x items: mean co-occurrence (item-item cosine of their user sets) of each item with the
    user's last ``recent`` history items; 0 for an empty history. Training-free: a table of counts."""
    scores = np.zeros((len(histories), cooccurrence.shape[0]), dtype=np.float64)
    for row, history in enumerate(histories):
        scores[row] = table_rows(cooccurrence, history[-recent:])
    return scores


def next_item_scores(transitions: sparse.csr_array, history: Sequence[int], recent: int = 5) -> np.ndarray:
    """Per item: the mean of ``transitions`` rows of the last ``recent`` history items, the most recent
    weighted 1, the one before :data:`RECENCY_DECAY`, and so on; 0 for an empty history."""
    last = list(history)[-recent:][::-1]
    return table_rows(transitions, last, RECENCY_DECAY ** np.arange(len(last)))


def next_item_baseline_scores(transitions: sparse.csr_array, histories: list[list[int]], recent: int) -> np.ndarray:
    """users x items: :func:`next_item_scores` of each history (the ranker's ``next_recent`` feature alone)."""
    scores = np.zeros((len(histories), transitions.shape[0]), dtype=np.float64)
    for row, history in enumerate(histories):
        scores[row] = next_item_scores(transitions, history, recent)
    return scores


def fold_in_scores(
    item_factors: np.ndarray, item_bias: np.ndarray, histories: list[list[int]], reg: float
) -> np.ndarray:
    """users x items: BPR scores with each user's vector re-estimated from their whole history
    (:func:`fold_in`), so the test-time history (validation item included) is used as the ranker uses it."""
    factors = item_factors.astype(np.float64)
    users = np.stack([fold_in(factors, history, reg) for history in histories]) if histories else np.zeros((0, 0))
    return users @ factors.T + item_bias
