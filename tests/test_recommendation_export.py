"""Our split exported as RecBole atomic files (domainflow/recsys/atomic_export.py) reads back as the same
users, targets, masks and histories (the round trip the peer benchmark relies on; no RecBole needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from domainflow.recsys import atomic_export, data, protocol
from domainflow.recsys.dataset import RankingData, write_dataset
from tests.recsys_helpers import write_series_data


@pytest.fixture(scope="module")
def series_data(tmp_path_factory: pytest.TempPathFactory) -> RankingData:
    folder = write_series_data(tmp_path_factory.mktemp("series"), num_users=40)
    interactions, items = (
        pd.read_csv(folder / "interactions.csv", dtype=str),
        pd.read_csv(folder / "items.csv", dtype=str),
    )
    clean, clean_items, _ = data.validate(interactions, items, {"interactions": "i.csv", "items": "m.csv"})
    clean_items["text"] = clean_items["title"]
    split = protocol.leave_last_out(clean, 4.0, 3, catalogue=clean_items["item_id"].tolist())
    write_dataset(folder / "ds", clean_items, split, {})
    return RankingData.load(folder / "ds")


def test_general_files_round_trip_to_our_users_targets_and_masks(series_data: RankingData, tmp_path: Path) -> None:
    folder = atomic_export.export_general(series_data, tmp_path / "general", "split")
    num_users, num_items = len(series_data.index.users), len(series_data.index.items)
    back = atomic_export.read_general(folder, "split", num_users, num_items)
    for stage in ("valid", "test"):
        ours = series_data.stage(stage)
        assert back[stage].users.tolist() == ours.users.tolist()
        assert back[stage].targets.tolist() == ours.targets.tolist()
        assert np.array_equal(back[stage].excluded, ours.excluded), stage
    # The masks are not trivially equal: at test the validation item (a positive) is masked too, and a
    # non-positive train interaction (rating 2, one per user) is masked at both stages.
    assert (back["test"].excluded.sum(axis=1) == back["valid"].excluded.sum(axis=1) + 1).all()
    low = series_data.train[~series_data.train["positive"]]
    rows = {u: r for r, u in enumerate(back["valid"].users)}
    for user, item in zip(low["user_id"], low["item_id"], strict=True):
        u = series_data.index.user_pos[user]
        if u in rows:
            assert back["valid"].excluded[rows[u], series_data.index.item_pos[item]]
    items = (folder / "split.item").read_text().splitlines()
    assert items[0] == "item_id:token" and len(items) == 1 + num_items  # every item is a candidate


def test_sequential_files_carry_the_stage_histories(series_data: RankingData, tmp_path: Path) -> None:
    """Histories truncated to the 3 most recent items: valid = train history, test = + the validation item."""
    folder = atomic_export.export_sequential(series_data, tmp_path / "seq", "split", max_length=3)
    for stage in ("valid", "test"):
        histories = series_data.stage(stage).histories
        assert atomic_export.read_sequences(folder, "split", stage) == [h[-3:] for h in histories]
    train = atomic_export._read(folder / "split.train.inter")
    full = series_data.histories_from(series_data.train)
    expected = [(u, h[t], h[max(0, t - 3) : t]) for u, h in enumerate(full) for t in range(1, len(h))]
    got = atomic_export.read_sequences(folder, "split", "train")
    assert [(int(u), int(i), s) for u, i, s in zip(train["user_id"], train["item_id"], got, strict=True)] == expected
    # The targets and masks a general model is scored on are the same files' user/item columns.
    back = atomic_export.read_general(folder.parent / "seq", "split", len(full), len(series_data.index.items))
    assert back["test"].targets.tolist() == series_data.stage("test").targets.tolist()
