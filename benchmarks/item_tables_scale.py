"""The recommender's item x item tables at catalogue sizes beyond MovieLens: sparse (now) vs dense (before).

    .venv/bin/python benchmarks/item_tables_scale.py [--items 2000 10000 50000] [--neighbours 200]

Builds the three tables the ranker reads (co-occurrence cosine, windowed transitions, immediate successors;
:mod:`domainflow.recsys.features`) from synthetic interactions shaped like a catalogue's (item popularity
Zipf-distributed with exponent 1, 20 interactions per user, 2 users per item), and reports build seconds and
bytes held for three ways of building them, side by side in one process:

* ``dense``: the former implementation, re-stated here as the baseline (a users x items 0/1 matrix multiplied
  by its transpose; transition counts accumulated into an items x items array); skipped where its arrays
  would pass ``--dense-limit-gb``;
* ``sparse``: what the pipeline builds by default (``item_neighbours`` unset: every non-zero kept, exact);
* ``sparse top-k``: with ``item_neighbours = K`` (``--neighbours``), the bound a large catalogue sets.

Ratios are dense ÷ sparse. Bytes are what a bundle's ``tables.safetensors`` stores for the three tables
(CSR values, column indices, row pointers); dense is items² × 4 bytes per table. Synthetic data, so the
density of the tables (and with it the sparse size) depends on the generator: MovieLens-100K's co-occurrence
is 63% non-zero, its transitions 13% and successors 2% (measured on the pipeline's base split).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import argument_parser  # noqa: E402
from domainflow.recsys.baselines import table_bytes  # noqa: E402
from domainflow.recsys.features import (  # noqa: E402
    TRANSITION_DECAY,
    TRANSITION_WINDOW,
    cooccurrence_cosine,
    transition_probabilities,
)

PER_USER = 20
T = TypeVar("T")


def synthetic(num_items: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[list[int]], int]:
    """(users, items, histories, num_users): each user draws PER_USER items by Zipf popularity, in draw order."""
    rng = np.random.default_rng(seed)
    num_users = 2 * num_items
    weights = 1.0 / np.arange(1, num_items + 1)
    draws = rng.choice(num_items, size=(num_users, PER_USER), p=weights / weights.sum())
    users = np.repeat(np.arange(num_users), PER_USER)
    return users, draws.ravel(), [row.tolist() for row in draws], num_users


def dense_tables(
    users: np.ndarray, items: np.ndarray, histories: list[list[int]], num_users: int, num_items: int
) -> list[np.ndarray]:
    """The tables as the pipeline built them before they were sparse (the baseline)."""
    marks = np.zeros((num_users, num_items), dtype=np.float32)
    marks[users, items] = 1.0
    counts = marks.T @ marks
    norms = np.sqrt(np.diag(counts)).clip(min=1e-6)
    cosine = counts / norms[:, None] / norms[None, :]
    np.fill_diagonal(cosine, 0.0)
    del marks, counts
    tables = [cosine.astype(np.float32)]
    for window, decay in ((TRANSITION_WINDOW, TRANSITION_DECAY), (1, 1.0)):
        moves = np.zeros((num_items, num_items), dtype=np.float64)
        for history in histories:
            sequence = np.asarray(history)
            for gap in range(1, window + 1):
                np.add.at(moves, (sequence[:-gap], sequence[gap:]), decay ** (gap - 1))
        np.fill_diagonal(moves, 0.0)
        totals = moves.sum(axis=1, keepdims=True)
        tables.append(np.divide(moves, totals, out=np.zeros_like(moves), where=totals > 0).astype(np.float32))
    return tables


def sparse_tables(
    users: np.ndarray,
    items: np.ndarray,
    histories: list[list[int]],
    num_users: int,
    num_items: int,
    neighbours: int | None,
) -> list[sparse.csr_array]:
    return [
        cooccurrence_cosine(users, items, num_users, num_items, neighbours),
        transition_probabilities(histories, num_items, TRANSITION_WINDOW, TRANSITION_DECAY, neighbours),
        transition_probabilities(histories, num_items, neighbours=neighbours),
    ]


def timed(build: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = build()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--items", type=int, nargs="+", default=[2000, 10000, 50000], help="catalogue sizes")
    parser.add_argument("--neighbours", type=int, default=200, help="item_neighbours of the top-k variant")
    parser.add_argument("--dense-limit-gb", type=float, default=4.0, help="skip dense above this many GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("| items | users | way | build s | MB held | dense ÷ this: time | dense ÷ this: bytes |")
    print("|---|---|---|---|---|---|---|")
    for num_items in args.items:
        users, items, histories, num_users = synthetic(num_items, args.seed)
        dense_gb = (num_users * num_items + 3 * num_items**2) * 4 / 1e9
        dense_seconds = dense_bytes = None
        if dense_gb <= args.dense_limit_gb:
            tables, dense_seconds = timed(partial(dense_tables, users, items, histories, num_users, num_items))
            dense_bytes = sum(table.nbytes for table in tables)
            del tables
            print(f"| {num_items} | {num_users} | dense | {dense_seconds:.2f} | {dense_bytes / 1e6:.0f} | 1.0 | 1.0 |")
        else:
            print(f"| {num_items} | {num_users} | dense | skipped: needs {dense_gb:.0f} GB | | | |")
        for label, neighbours in (("sparse", None), (f"sparse top-{args.neighbours}", args.neighbours)):
            built, seconds = timed(partial(sparse_tables, users, items, histories, num_users, num_items, neighbours))
            held = sum(table_bytes(table) for table in built)
            ratio_time = f"{dense_seconds / seconds:.1f}" if dense_seconds else "–"
            ratio_bytes = f"{dense_bytes / held:.1f}" if dense_bytes else "–"
            row = f"| {num_items} | {num_users} | {label} | {seconds:.2f} | {held / 1e6:.0f} |"
            print(f"{row} {ratio_time} | {ratio_bytes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
