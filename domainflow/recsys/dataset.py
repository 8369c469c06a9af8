"""A split ranking dataset on disk, and the per-user histories every model reads from it.

Why one class: the text model, the ranker, the baselines and serving must agree on what a
user's history is at each stage, or a metric measures a different situation from the one the
model was fitted for. The stages:

* ``fit`` — the ranker's own training examples, from the train split alone: each user's last
  train positive (with at least one interaction before it) is held back as a *fit target*. The
  models the ranker reads as features (text model, BPR, co-occurrence, popularity) are trained
  on :meth:`RankingData.base_train`, which stops before those targets, so a feature never saw
  the example it is scored on (the leak that makes a stacked ranker trust overfitted features);
* ``valid`` — history = the train split, target = the validation item (model choice only);
* ``test`` — history = train + the validation item (history by then), target = the test item.

A *history* is every interaction of the user in chronological order, whatever its rating:
serving receives a list of items a user watched, with no ratings, so the models read the
same thing in evaluation. Targets and positives follow the protocol (rating >= threshold).

On disk: ``items.parquet`` (catalogue order, with the item text and ``cold``: whether the
cold-start protocol kept the item out of train), ``train.parquet``, ``holdout.parquet`` and
``report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from domainflow.recsys.protocol import Index, Split, build_index, seen_matrix

STAGES = ("fit", "valid", "test")
REPORT_FILE = "report.json"


@dataclass
class StageRows:
    """One row per user evaluated at a stage: who, what they did before, and what to predict."""

    users: np.ndarray  # user positions (Index.user_pos)
    histories: list[list[int]]  # item positions, oldest first
    targets: np.ndarray  # item position of the held-out positive
    excluded: np.ndarray  # users x items: never candidates (already in the history)


def sample_users(interactions: pd.DataFrame, max_users: int | None, seed: int) -> pd.DataFrame:
    """Keep every interaction of ``max_users`` users drawn at random (quick runs); None keeps all."""
    users = np.sort(interactions["user_id"].unique())
    if max_users is None or max_users >= len(users):
        return interactions
    kept = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
    return interactions[interactions["user_id"].isin(kept)].reset_index(drop=True)


def write_dataset(out_dir: Path, items: pd.DataFrame, split: Split, report: dict) -> None:
    """Write the split with its report (the caller publishes ``out_dir`` atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items = items.assign(cold=items["item_id"].isin(set(split.cold_items)).to_numpy())
    items.to_parquet(out_dir / "items.parquet", index=False)
    split.train.to_parquet(out_dir / "train.parquet", index=False)
    split.holdout.to_parquet(out_dir / "holdout.parquet", index=False)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))


@dataclass
class RankingData:
    """The catalogue, the train split and the held-out items of one ingested dataset."""

    items: pd.DataFrame  # item_id, title, year, genres, text
    train: pd.DataFrame  # user_id, item_id, rating, timestamp, positive (chronological per user)
    holdout: pd.DataFrame  # user_id, valid_item, test_item, valid_timestamp, test_timestamp

    @classmethod
    def load(cls, path: str | Path) -> RankingData:
        path = Path(path)
        read = lambda name: pd.read_parquet(path / name)  # noqa: E731
        items, train, holdout = read("items.parquet"), read("train.parquet"), read("holdout.parquet")
        for frame, column in ((items, "item_id"), (train, "user_id"), (train, "item_id"), (holdout, "user_id")):
            frame[column] = frame[column].astype(str)
        for column in ("valid_item", "test_item"):
            holdout[column] = holdout[column].astype(str)
        return cls(items=items, train=train, holdout=holdout)

    @cached_property
    def index(self) -> Index:
        return build_index(self.items, self.train, self.holdout)

    @cached_property
    def cold_mask(self) -> np.ndarray:
        """Per item (catalogue order): kept out of train by the cold-start protocol (all False otherwise)."""
        if "cold" not in self.items:
            return np.zeros(len(self.items), dtype=bool)
        return self.items["cold"].to_numpy(dtype=bool)

    @property
    def split(self) -> Split:
        return Split(train=self.train, holdout=self.holdout)

    @property
    def item_texts(self) -> list[str]:
        return self.items["text"].tolist()

    def _positions(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Interactions as (u, i, positive) integer positions, chronological per user."""
        return pd.DataFrame(
            {
                "u": frame["user_id"].map(self.index.user_pos).to_numpy(),
                "i": frame["item_id"].map(self.index.item_pos).to_numpy(),
                "positive": frame["positive"].to_numpy(dtype=bool),
            }
        )

    @cached_property
    def _train_positions(self) -> pd.DataFrame:
        return self._positions(self.train)

    @cached_property
    def fit_targets(self) -> pd.DataFrame:
        """Per user: the row (in ``train``) of its last train positive that has an interaction before it."""
        frame = self._train_positions.copy()
        frame["row"] = np.arange(len(frame))
        frame["order"] = frame.groupby("u").cumcount()
        candidates = frame[frame["positive"] & (frame["order"] >= 1)]
        return candidates.groupby("u").tail(1)[["u", "i", "row", "order"]].reset_index(drop=True)

    def base_train(self) -> pd.DataFrame:
        """``train`` without each fit target and what followed it: what the ranker's feature models learn from."""
        frame = self._train_positions
        cut = pd.Series(self.fit_targets["order"].to_numpy(), index=self.fit_targets["u"].to_numpy())
        order = frame.groupby("u").cumcount().to_numpy()
        limit = frame["u"].map(cut).fillna(np.inf).to_numpy()
        return self.train[order < limit].reset_index(drop=True)

    def base_positions(self) -> pd.DataFrame:
        """:meth:`base_train` as integer positions."""
        return self._positions(self.base_train())

    def histories_from(self, frame: pd.DataFrame) -> list[list[int]]:
        """Item positions per user (indexed by user position), oldest first."""
        histories: list[list[int]] = [[] for _ in self.index.users]
        positions = self._positions(frame)
        for u, i in zip(positions["u"].to_numpy(), positions["i"].to_numpy(), strict=True):
            histories[u].append(int(i))
        return histories

    def stage(self, name: str) -> StageRows:
        """Users, histories, targets and excluded items of one stage (see the module docstring)."""
        num_items = len(self.index.items)
        if name == "fit":
            fit = self.fit_targets
            base = self.histories_from(self.base_train())
            users = fit["u"].to_numpy()
            histories = [base[u] for u in users]
            excluded = np.zeros((len(users), num_items), dtype=bool)
            for row, history in enumerate(histories):
                excluded[row, history] = True
            return StageRows(users, histories, fit["i"].to_numpy(), excluded)
        if name not in ("valid", "test"):
            raise ValueError(f"stage must be one of {STAGES}, got {name!r}")
        train = self.histories_from(self.train)
        users = self.holdout["user_id"].map(self.index.user_pos).to_numpy()
        valid_items = self.holdout["valid_item"].map(self.index.item_pos).to_numpy()
        histories = [list(train[u]) for u in users]
        if name == "test":
            for history, item in zip(histories, valid_items, strict=True):
                history.append(int(item))
        column = "valid_item" if name == "valid" else "test_item"
        targets = self.holdout[column].map(self.index.item_pos).to_numpy()
        excluded = seen_matrix(self.split, self.index, name)[users]
        return StageRows(users, histories, targets, excluded)


def history_texts(
    item_texts: Sequence[str], histories: Sequence[Sequence[int]], render: Callable[[Sequence[str]], str]
) -> list[str]:
    """The user-tower input of each history (``render`` is the domain's ``history_text``)."""
    return [render([item_texts[i] for i in history]) for history in histories]
