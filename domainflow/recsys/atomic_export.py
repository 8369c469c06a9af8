"""Our split as RecBole atomic files, so that peer models train and are evaluated on exactly it.

Why pre-split benchmark files: RecBole, left to itself, splits and filters the data its own way.
With ``benchmark_filename = ["train", "valid", "test"]`` it reads ``<name>.train.inter``,
``<name>.valid.inter`` and ``<name>.test.inter`` as they are, and in full ranking it excludes,
for a user, the items of the earlier files (valid: train; test: train + valid) — which is our
protocol's candidate set when the files hold:

* ``train`` — every train interaction, whatever its rating (our mask excludes all of them);
* ``valid`` / ``test`` — one row per evaluated user: the validation / test item;
* ``<name>.item`` — every catalogue item, so that items nobody interacted with are candidates too.

Sequential models (GRU4Rec, SASRec) read their input sequence from an ``item_id_list`` column
instead, so their files (:func:`export_sequential`) carry, per row, the history before the target:
train rows are every train interaction after a user's first, valid rows the train history, test
rows the train history plus the validation item — the histories :meth:`RankingData.stage` gives.

Tokens are catalogue / user *positions* (``Index``), not raw ids: any id (with spaces, say) is
safe, and a RecBole token maps back to our item position with ``int(token)``.
:func:`read_general` reads the files back the way RecBole interprets them, for the round-trip check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from domainflow.recsys.dataset import RankingData

STAGE_FILES = ("train", "valid", "test")
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
SEQUENCE_HEADER = "user_id:token\titem_id:token\ttimestamp:float\titem_id_list:token_seq"


def _stage_rows(data: RankingData) -> dict[str, pd.DataFrame]:
    """user / item positions and timestamps of the three files (general models)."""
    train = pd.DataFrame(
        {
            "u": data.train["user_id"].map(data.index.user_pos).to_numpy(),
            "i": data.train["item_id"].map(data.index.item_pos).to_numpy(),
            "t": data.train["timestamp"].to_numpy(dtype=np.float64),
        }
    )
    users = data.holdout["user_id"].map(data.index.user_pos).to_numpy()
    rows = {"train": train}
    for stage, item, stamp in (("valid", "valid_item", "valid_timestamp"), ("test", "test_item", "test_timestamp")):
        rows[stage] = pd.DataFrame(
            {
                "u": users,
                "i": data.holdout[item].map(data.index.item_pos).to_numpy(),
                "t": data.holdout[stamp].to_numpy(dtype=np.float64),
            }
        )
    return rows


def _write(path: Path, header: str, lines: list[str]) -> None:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")


def _write_items(folder: Path, name: str, num_items: int) -> None:
    _write(folder / f"{name}.item", "item_id:token", [str(i) for i in range(num_items)])


def export_general(data: RankingData, folder: Path, name: str) -> Path:
    """``<name>.{train,valid,test}.inter`` and ``<name>.item`` for general models; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage, frame in _stage_rows(data).items():
        lines = [f"{u}\t{i}\t{t!r}" for u, i, t in frame.itertuples(index=False)]
        _write(folder / f"{name}.{stage}.inter", INTER_HEADER, lines)
    _write_items(folder, name, len(data.index.items))
    return folder


def export_sequential(data: RankingData, folder: Path, name: str, max_length: int) -> Path:
    """The same split with an ``item_id_list`` (the last ``max_length`` items before the target) per row."""
    folder.mkdir(parents=True, exist_ok=True)
    histories = data.histories_from(data.train)
    stamps: list[list[float]] = [[] for _ in data.index.users]
    for user, stamp in zip(
        data.train["user_id"].map(data.index.user_pos).to_numpy(), data.train["timestamp"].to_numpy(), strict=True
    ):
        stamps[int(user)].append(float(stamp))
    train_lines = []
    for u, history in enumerate(histories):
        for step in range(1, len(history)):
            before = " ".join(map(str, history[max(0, step - max_length) : step]))
            train_lines.append(f"{u}\t{history[step]}\t{stamps[u][step]!r}\t{before}")
    _write(folder / f"{name}.train.inter", SEQUENCE_HEADER, train_lines)
    for stage in ("valid", "test"):
        rows = data.stage(stage)
        frame = _stage_rows(data)[stage]
        lines = [
            f"{u}\t{i}\t{t!r}\t{' '.join(map(str, history[-max_length:]))}"
            for (u, i, t), history in zip(frame.itertuples(index=False), rows.histories, strict=True)
        ]
        _write(folder / f"{name}.{stage}.inter", SEQUENCE_HEADER, lines)
    _write_items(folder, name, len(data.index.items))
    return folder


@dataclass
class ReadBack:
    """One evaluation stage as RecBole's full ranking sees the files: per evaluated user (in file
    order), the target and the items excluded from the candidates (those of the earlier files)."""

    users: np.ndarray
    targets: np.ndarray
    excluded: np.ndarray  # users x items


def _read(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [column.split(":")[0] for column in frame.columns]
    return frame


def read_general(folder: Path, name: str, num_users: int, num_items: int) -> dict[str, ReadBack]:
    """``valid`` and ``test`` as RecBole interprets the files (candidates = items not in earlier files)."""
    frames = {stage: _read(folder / f"{name}.{stage}.inter") for stage in STAGE_FILES}
    seen = np.zeros((num_users, num_items), dtype=bool)
    out = {}
    for stage in STAGE_FILES:
        frame = frames[stage]
        users, items = frame["user_id"].astype(int).to_numpy(), frame["item_id"].astype(int).to_numpy()
        if stage != "train":
            if len(np.unique(users)) != len(users):
                raise ValueError(f"{name}.{stage}.inter: a user has more than one held-out item")
            out[stage] = ReadBack(users, items, seen[users].copy())
        seen[users, items] = True
    return out


def read_sequences(folder: Path, name: str, stage: str) -> list[list[int]]:
    """The ``item_id_list`` of each row of a sequential file, as item positions."""
    frame = _read(folder / f"{name}.{stage}.inter")
    return [[int(token) for token in text.split()] for text in frame["item_id_list"]]
