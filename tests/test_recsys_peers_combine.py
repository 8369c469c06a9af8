"""benchmarks/recsys_peers.py --combine: runs made in separate processes pool into one table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from benchmarks import recsys_peers
from domainflow.recsys.bootstrap import per_user

USERS = 200


def ranks(seed: int, spread: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, spread, size=USERS)


def peer_row(
    name: str, runs: list[np.ndarray], ranker: np.ndarray, split: str, params: dict[str, Any], seeds: list[int]
) -> dict:
    return recsys_peers.table_row(
        name,
        runs,
        [0.05] * len(runs),
        [ranker],
        split,
        params=params,
        seed_numbers=seeds,
        run_seconds=[10.0] * len(runs),
        max_epochs=20,
    )


def ranker_row(ranker: np.ndarray, split: str) -> dict:
    return recsys_peers.table_row(recsys_peers.RANKER, [ranker], [0.1], None, split)


def write(path: Path, rows: list[dict]) -> Path:
    recsys_peers.write_rows(rows, path)
    return path


def test_combined_seeds_equal_one_run_of_both_seeds(tmp_path: Path) -> None:
    ranker, seed0, seed1 = ranks(0, 40), ranks(1, 80), ranks(2, 80)
    params = {"dropout_prob": 0.2}
    first = write(
        tmp_path / "a.json", [peer_row("GRU4Rec", [seed0], ranker, "s", params, [0]), ranker_row(ranker, "s")]
    )
    second = write(
        tmp_path / "b.json", [peer_row("GRU4Rec", [seed1], ranker, "s", params, [1]), ranker_row(ranker, "s")]
    )

    combined = {row["model"]: row for row in recsys_peers.combine([first, second])}
    together = recsys_peers.summarise("GRU4Rec", [seed0, seed1], [ranker])

    gru = combined["GRU4Rec"]
    assert gru["seeds"] == 2
    expected = np.mean([per_user(seed0, "ndcg_at_10"), per_user(seed1, "ndcg_at_10")], axis=0).mean()
    assert gru["ndcg_at_10"].mean == pytest.approx(expected)
    for metric in ("hit_rate_at_10", "ndcg_at_10", "mrr", "ranker_minus"):
        assert gru[metric] == together[metric]
    assert combined[recsys_peers.RANKER]["ndcg_at_10"].mean == pytest.approx(per_user(ranker, "ndcg_at_10").mean())
    # the pooled table can be written and pooled again
    again = recsys_peers.combine([write(tmp_path / "c.json", list(combined.values()))])
    assert {row["model"]: row["seeds"] for row in again} == {"GRU4Rec": 2, recsys_peers.RANKER: 1}


def test_files_of_different_splits_or_settings_are_refused(tmp_path: Path) -> None:
    ranker = ranks(0, 40)
    a = write(tmp_path / "a.json", [peer_row("SASRec", [ranks(1, 80)], ranker, "split-1", {"p": 0.2}, [0])])
    b = write(tmp_path / "b.json", [peer_row("SASRec", [ranks(2, 80)], ranker, "split-2", {"p": 0.2}, [1])])
    with pytest.raises(SystemExit, match="one split"):
        recsys_peers.combine([a, b])
    c = write(tmp_path / "c.json", [peer_row("SASRec", [ranks(3, 80)], ranker, "split-1", {"p": 0.5}, [1])])
    with pytest.raises(SystemExit, match="no seed common to all of them"):
        recsys_peers.combine([a, c])
    twice = write(tmp_path / "twice.json", [peer_row("SASRec", [ranks(5, 80)], ranker, "split-1", {"p": 0.2}, [0])])
    with pytest.raises(SystemExit, match="seed in more than one file"):
        recsys_peers.combine([a, twice])
    d = write(tmp_path / "d.json", [ranker_row(ranks(4, 40), "split-1")])
    e = write(tmp_path / "e.json", [ranker_row(ranker, "split-1")])
    with pytest.raises(SystemExit, match="different rankers"):
        recsys_peers.combine([a, d, e])
    assert json.loads(a.read_text())[0]["split"] == "split-1"


def grid_file(path: Path, dropout: float, seeds: list[int], valid: list[float], ranker: np.ndarray) -> Path:
    runs = [ranks(10 * seed + int(dropout * 10), 80) for seed in seeds]
    row = recsys_peers.table_row(
        "SASRec",
        runs,
        valid,
        [ranker],
        "s",
        params={"p": dropout},
        seed_numbers=seeds,
        run_seconds=[1.0] * len(seeds),
        max_epochs=20,
    )
    return write(path, [row])


@pytest.mark.parametrize("second_point_valid, chosen, seeds", [(0.20, 0.5, [0]), (0.08, 0.2, [0, 1, 2])])
def test_grid_points_from_separate_files_are_chosen_on_the_first_seed(
    tmp_path: Path, second_point_valid: float, chosen: float, seeds: list[int]
) -> None:
    """--grid-point runs: the setting with the best seed-0 validation NDCG@10 is the row, the other is only
    in the grid record. Seeds 1 and 2 of the first point score higher on validation than either seed 0 run:
    the choice must not look at them (a mean over seeds would pick the first point in both cases)."""
    ranker = ranks(0, 40)
    first_point = grid_file(tmp_path / "p1.json", 0.2, [0, 1, 2], [0.10, 0.30, 0.30], ranker)
    second_point = grid_file(tmp_path / "p2.json", 0.5, [0], [second_point_valid], ranker)

    (row,) = recsys_peers.combine([first_point, second_point])

    assert row["params"] == {"p": chosen}
    assert row["seed_numbers"] == seeds
    expected = np.mean([per_user(ranks(10 * s + int(chosen * 10), 80), "ndcg_at_10") for s in seeds], axis=0)
    assert row["ndcg_at_10"].mean == pytest.approx(expected.mean())
    assert sorted((point["params"]["p"], point["valid_ndcg"]) for point in row["grid"]) == [
        (0.2, 0.10),
        (0.5, second_point_valid),
    ]


def test_grid_point_is_one_setting_of_each_grid() -> None:
    assert recsys_peers.grid_settings("SASRec", 2, None) == [recsys_peers.GRIDS["SASRec"][1]]
    assert recsys_peers.grid_settings("BPR", None, 1) == recsys_peers.GRIDS["BPR"][:1]
    with pytest.raises(SystemExit, match="Pop's grid has 1 setting"):
        recsys_peers.grid_settings("Pop", 2, None)


def test_a_rescored_ranker_replaces_the_files_ranker_row(tmp_path: Path) -> None:
    """``--combine --ranker``: peers trained against an old ranker are compared with a new one, the paired
    difference recomputed from the new ranks; a bundle from another split is refused."""
    old, new, peer = ranks(0, 40), ranks(6, 20), ranks(1, 80)
    a = write(tmp_path / "a.json", [peer_row("GRU4Rec", [peer], old, "s", {}, [0]), ranker_row(old, "s")])
    rescored = (tmp_path / "s", {"valid": ranks(7, 20), "test": new})
    combined = {row["model"]: row for row in recsys_peers.combine([a], rescored)}
    assert combined["GRU4Rec"]["ranker_minus"] == recsys_peers.summarise("GRU4Rec", [peer], [new])["ranker_minus"]
    assert combined["GRU4Rec"]["ranker_minus"] != recsys_peers.summarise("GRU4Rec", [peer], [old])["ranker_minus"]
    ours = combined[recsys_peers.RANKER]
    assert ours["test_ranks"] == [new.tolist()]
    assert ours["valid_ndcgs"] == [pytest.approx(per_user(rescored[1]["valid"], "ndcg_at_10").mean())]
    with pytest.raises(SystemExit, match="do not hold the same split"):
        recsys_peers.combine([a], (tmp_path / "other", rescored[1]))


def test_same_split_reads_the_files_not_the_folder_name(tmp_path: Path) -> None:
    """Two folders of one split (a later ingest added a column to items.parquet) are the same split; a moved
    target is not."""
    from tests.test_recommendation_models import write_hand_dataset

    first = write_hand_dataset(tmp_path / "first")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    items = pd.read_parquet(second / "items.parquet")
    items.assign(extra=1).to_parquet(second / "items.parquet", index=False)
    assert recsys_peers.same_split(first, second)
    holdout = pd.read_parquet(second / "holdout.parquet")
    holdout["test_item"] = holdout["valid_item"]
    holdout.to_parquet(second / "holdout.parquet", index=False)
    assert not recsys_peers.same_split(first, second)
