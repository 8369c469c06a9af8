"""The recommendation protocol, metrics, validation and baselines on hand-made tables (no download)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from domainflow.recsys import baselines, data, protocol

ITEMS = pd.DataFrame(
    {
        "item_id": ["i1", "i2", "i3", "i4", "i5"],
        "title": ["A", "B", "C", "D", "E"],
        "genres": ["x", "y", "x|y", "x", ""],
        "year": ["1990"] * 5,
    }
)
SOURCES = {"interactions": "inter.csv", "items": "items.csv"}


def hand_made() -> pd.DataFrame:
    """User a: positives i1, i3, i4 (i2 rated 3; i5 rated 2 at i4's second, ordered after it by item id).
    User b: two positives only, so not evaluated."""
    rows = [
        ("a", "i1", 5, 1),
        ("a", "i2", 3, 2),
        ("a", "i3", 4, 3),
        ("a", "i4", 5, 4),
        ("a", "i5", 2, 4),
        ("b", "i2", 5, 1),
        ("b", "i5", 4, 2),
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(str)


def split_and_index():
    clean, items, _ = data.validate(hand_made(), ITEMS, SOURCES)
    split = protocol.leave_last_out(clean, 4.0, min_positives=3, catalogue=items["item_id"].tolist())
    return split, protocol.build_index(items, clean)


def test_leave_last_out_by_hand() -> None:
    split, _ = split_and_index()
    assert split.holdout[["user_id", "valid_item", "test_item"]].values.tolist() == [["a", "i3", "i4"]]
    train = {(u, i) for u, i in split.train[["user_id", "item_id"]].itertuples(index=False)}
    # a keeps only what came before its validation item; b (too few positives) keeps everything
    assert train == {("a", "i1"), ("a", "i2"), ("b", "i2"), ("b", "i5")}
    assert split.train.loc[split.train.user_id == "a", "positive"].tolist() == [True, False]


def test_no_leakage_and_candidates() -> None:
    split, index = split_and_index()
    valid_seen = protocol.seen_matrix(split, index, "valid")[index.user_pos["a"]]
    test_seen = protocol.seen_matrix(split, index, "test")[index.user_pos["a"]]
    assert valid_seen.tolist() == [True, True, False, False, False]
    assert test_seen.tolist() == [True, True, True, False, False]  # the validation item is history at test time
    with pytest.raises(AssertionError, match="overlap"):
        protocol.target_ranks(np.zeros((1, 5)), np.array([0]), valid_seen[None, :])


def test_ranks_and_metrics_by_hand() -> None:
    split, index = split_and_index()
    scores = np.array([[9.0, 8.0, 1.0, 2.0, 2.0]])  # seen items score highest: they must not count
    valid, valid_ranks = protocol.evaluate_scores(lambda users, stage: scores, split, index, "valid")
    test, test_ranks = protocol.evaluate_scores(lambda users, stage: scores, split, index, "test")
    assert valid_ranks.tolist() == [3]  # i4 and i5 (2.0) beat i3 (1.0)
    assert test_ranks.tolist() == [1]  # i5 ties i4 but comes later in the catalogue
    assert (
        valid["ndcg_at_10"] == pytest.approx(0.5)
        and valid["mrr"] == pytest.approx(1 / 3)
        and valid["hit_rate_at_10"] == 1.0
    )
    assert test == {"hit_rate_at_10": 1.0, "ndcg_at_10": 1.0, "mrr": 1.0}


def test_metric_modules() -> None:
    got = protocol.ranking_metrics([1, 3, 11])
    assert got["hit_rate_at_10"] == pytest.approx(2 / 3)
    assert got["ndcg_at_10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)


def test_validation_names_file_row_and_problem() -> None:
    bad = hand_made()
    bad.loc[1, "item_id"] = "zz"
    bad.loc[3, "timestamp"] = "yesterday"
    bad.loc[4, "rating"] = "five"
    with pytest.raises(data.RankingDataError) as info:
        data.validate(bad, ITEMS, SOURCES)
    message = str(info.value)
    assert "inter.csv: item_id not found in items.csv at line 3 ('zz')" in message
    assert "timestamp is not a number of seconds or an ISO date-time at line 5" in message
    assert "rating is not a number at line 6" in message
    items = ITEMS.copy()
    items.loc[2, "title"] = " "
    items.loc[4, "item_id"] = "i1"
    with pytest.raises(data.RankingDataError, match=r"duplicate item_id at line 6 \('i1'\)"):
        data.validate(hand_made(), items, SOURCES)


def test_repeat_interactions_keep_the_latest() -> None:
    frame = pd.concat(
        [hand_made(), pd.DataFrame([["a", "i1", "1", "9"]], columns=["user_id", "item_id", "rating", "timestamp"])]
    )
    clean, _, report = data.validate(frame, ITEMS, SOURCES)
    assert report == {"repeat_interactions_dropped": 1}
    assert clean[(clean.user_id == "a") & (clean.item_id == "i1")][["rating", "timestamp"]].values.tolist() == [
        [1.0, 9.0]
    ]


def test_popularity_counts() -> None:
    assert baselines.popularity_scores(np.array([0, 2, 2, 4]), 5).tolist() == [1, 0, 2, 0, 1]


def test_bpr_learns_two_taste_groups() -> None:
    """Users 0-9 like items 0-4, users 10-19 like items 5-9; each user's last liked item is held out.
    BPR must rank the held-out item inside its own group's block (ranks 1-2 of the 6 unseen items)."""
    users, items, held = [], [], {}
    for user in range(20):
        group = range(0, 5) if user < 10 else range(5, 10)
        liked = list(group)
        held[user] = liked[user % 5]
        for item in liked:
            if item != held[user]:
                users.append(user)
                items.append(item)
    result = baselines.train_bpr(
        np.array(users),
        np.array(items),
        20,
        10,
        dim=8,
        epochs=200,
        learning_rate=0.05,
        weight_decay=1e-4,
        batch_size=32,
        seed=0,
    )
    scores = result.user_factors @ result.item_factors.T + result.item_bias
    seen = np.zeros((20, 10), dtype=bool)
    seen[users, items] = True
    ranks = protocol.target_ranks(scores, np.array([held[u] for u in range(20)]), seen)
    assert ranks.max() == 1  # the only unseen in-group item beats all five out-group items


def test_fold_in_recovers_a_user() -> None:
    """With orthonormal item factors, fold-in of a history is proportional to the sum of its items."""
    factors = np.eye(4)
    vector = baselines.fold_in(factors, [0, 2], reg=1.0)
    assert vector.tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0])


def test_same_second_interactions_are_ordered_by_catalogue_position() -> None:
    """Items "9" and "10" rated in the same second: as text "10" < "9", by catalogue position 9 comes
    first. So "10" is the test item and "9" the validation item, whatever order the file lists them in."""
    catalogue = [str(i) for i in range(1, 11)]
    items = pd.DataFrame({"item_id": catalogue, "title": [f"film {i}" for i in catalogue]})
    rows = [("u", "3", 5, 100), ("u", "10", 4, 200), ("u", "9", 5, 200), ("u", "1", 2, 50)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(str)
    splits = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        clean, clean_items, _ = data.validate(frame.iloc[order].reset_index(drop=True), items, SOURCES)
        assert clean["item_id"].tolist() == ["1", "3", "9", "10"]  # validate's order is already the protocol's
        split = protocol.leave_last_out(clean, 4.0, min_positives=3, catalogue=clean_items["item_id"].tolist())
        splits.append(split.holdout[["user_id", "valid_item", "test_item"]].values.tolist())
    assert splits == [[["u", "9", "10"]]] * 3
    with pytest.raises(ValueError, match=r"not in the catalogue: \['77'\]"):
        protocol.chronological(pd.DataFrame({"user_id": ["u"], "item_id": ["77"], "timestamp": [1.0]}), catalogue)
