"""The cold-start protocol on the invented film series (tests/recsys_helpers.py, titles that start with
their series' name): the split keeps the cold items out of every table a feature is built from, it is
seeded and stratified, cold targets exist, and only a model that reads item text can place them.

The series: each user watches 8 consecutive episodes of one of 4 series of 12; the validation and
test items are the 7th and 8th episode watched. A cold episode never appears in train, so no
collaborative table knows it; its title shares the series' name with the user's history, which the
text model reads, and nothing else does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from domainflow.catalog import get_domain
from domainflow.recsys import baselines as bl
from domainflow.recsys.bundle import Recommender, write_bundle
from domainflow.recsys.data import find_files
from domainflow.recsys.dataset import RankingData
from domainflow.recsys.features import (
    ALL_FEATURES,
    TRANSITION_DECAY,
    TRANSITION_WINDOW,
    cooccurrence_cosine,
    transition_probabilities,
)
from domainflow.recsys.protocol import choose_cold_items, cold_target_rows, ranking_metrics, target_ranks
from domainflow.recsys.ranker import fit_ranker
from domainflow.recsys.spec import RankingSpec
from tasks.rank_ingest import ingest_ranking
from tasks.rank_train import (
    TwoTowerConfig,
    catalogue,
    fit_features,
    fit_groups,
    item_tables,
    make_two_tower_config,
    negative_pool,
    positives_of,
    simulated_cold,
    text_pairs,
    train_text_model,
)
from tests.data_helpers import replace
from tests.recsys_helpers import register_series_domain, write_series_data

BPR_EPOCHS = 3
LENGTHS = {"history_max_length": 64, "item_max_length": 48, "history_items": 20}


@pytest.fixture(scope="module")
def cold_spec() -> RankingSpec:
    spec = get_domain(register_series_domain())
    assert isinstance(spec, RankingSpec)
    return replace(spec, name="rec_series_cold", split_protocol="cold_start", cold_item_share=0.25)


def _ingest(spec: RankingSpec, folder: Path, out: Path) -> RankingData:
    files = {kind: str(path) for kind, path in find_files(folder).items()}
    ingest_ranking(spec, files, out, fingerprint="test", max_users=None, seed=0)
    return RankingData.load(out)


@pytest.fixture(scope="module")
def series_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_series_data(tmp_path_factory.mktemp("series-named"), series_names=True)


@pytest.fixture(scope="module")
def cold_data(cold_spec: RankingSpec, series_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> RankingData:
    return _ingest(cold_spec, series_folder, tmp_path_factory.mktemp("cold") / "ds")


@pytest.fixture(scope="module")
def config(cold_spec: RankingSpec, tiny_model_dir: Path) -> TwoTowerConfig:
    return make_two_tower_config(cold_spec, str(tiny_model_dir), num_layers=1, seed=0)


def _cold_positions(data: RankingData) -> set[int]:
    return set(np.flatnonzero(data.cold_mask).tolist())


def test_cold_items_are_seeded_and_stratified_by_popularity() -> None:
    """20 items whose positives are 19, 18, ..., 0: 4 strata of 5 by popularity, 2 drawn from each
    (round(0.4 x 5)); the same seed draws the same items, another seed others."""
    catalogue_ids = [f"i{j}" for j in range(20)]
    positives = [item for j, item in enumerate(catalogue_ids) for _ in range(19 - j)]
    first = choose_cold_items(catalogue_ids, positives, 0.4, seed=7, strata=4)
    assert first == choose_cold_items(catalogue_ids, positives, 0.4, seed=7, strata=4)
    assert first != choose_cold_items(catalogue_ids, positives, 0.4, seed=8, strata=4)
    strata = [sum(int(item[1:]) // 5 == s for item in first) for s in range(4)]
    assert strata == [2, 2, 2, 2]
    assert first == sorted(first, key=catalogue_ids.index)  # catalogue order
    with pytest.raises(ValueError, match="between 0 and 1"):
        choose_cold_items(catalogue_ids, positives, 1.0, seed=7)


def test_the_split_is_deterministic_and_has_cold_targets(
    cold_spec: RankingSpec, cold_data: RankingData, series_folder: Path, tmp_path: Path
) -> None:
    again = _ingest(cold_spec, series_folder, tmp_path / "again")
    assert again.items["cold"].tolist() == cold_data.items["cold"].tolist()
    assert again.train.equals(cold_data.train) and again.holdout.equals(cold_data.holdout)
    assert cold_data.cold_mask.sum() == 10  # 5 popularity strata of 10, 10, 10, 9, 9 items: round(25%) = 2 of each
    cold_ids = set(cold_data.items.loc[cold_data.cold_mask, "item_id"])
    valid_cold = cold_data.holdout["valid_item"].isin(cold_ids).sum()
    test_cold = cold_data.holdout["test_item"].isin(cold_ids).sum()
    assert valid_cold >= 10 and test_cold >= 10, (valid_cold, test_cold)
    # the standard protocol on the same files: the same held-out items, and the cold items' interactions in train
    standard = _ingest(replace(cold_spec, split_protocol="standard"), series_folder, tmp_path / "standard")
    assert standard.holdout.equals(cold_data.holdout) and not standard.cold_mask.any()
    assert standard.train["item_id"].isin(cold_ids).sum() > 0
    assert "Cold-start protocol: 25%" in cold_spec.protocol and "Cold-start" not in standard.items.to_string()


def test_no_cold_item_in_any_training_table(cold_spec: RankingSpec, cold_data: RankingData, config) -> None:
    """Every table a feature or a baseline is built from: train and the base split (histories,
    co-occurrence, popularity), BPR's positives and negatives (and its trained factors: a cold item's
    are exactly their random start, so no training step touched it), the two-tower's pairs (targets and
    history texts), and the ranker's rows (targets, negatives and histories)."""
    data, cold = cold_data, _cold_positions(cold_data)
    pos = data.index.item_pos
    base = data.base_train()
    for name, frame in (("train", data.train), ("base_train", base)):
        assert not set(frame["item_id"].map(pos)) & cold, name
    for frame in (data.train, base):
        users, items = positives_of(data, frame)
        assert not set(items.tolist()) & cold
        assert bl.popularity_scores(items, len(pos))[sorted(cold)].sum() == 0
    all_users, all_items = base["user_id"].map(data.index.user_pos), base["item_id"].map(pos)
    cooc = cooccurrence_cosine(all_users.to_numpy(), all_items.to_numpy(), len(data.index.users), len(pos)).toarray()
    assert not cooc[sorted(cold)].any() and not cooc[:, sorted(cold)].any()
    histories = data.histories_from(base)
    for window in (1, TRANSITION_WINDOW):  # the sequential features' tables: no cold row, no cold column
        transitions = transition_probabilities(histories, len(pos), window, TRANSITION_DECAY).toarray()
        assert transitions.any() and not transitions[sorted(cold)].any() and not transitions[:, sorted(cold)].any()

    pool = negative_pool(data)
    assert pool is not None and not set(pool.tolist()) & cold and len(pool) == len(pos) - len(cold)
    users, items = positives_of(data, data.train)
    bpr = bl.train_bpr(
        users, items, len(data.index.users), len(pos), dim=8, epochs=BPR_EPOCHS, learning_rate=0.05,
        weight_decay=0.0, batch_size=64, seed=0, negative_pool=pool,
    )  # fmt: skip
    start = bl.BPR(len(data.index.users), len(pos), 8, seed=0).item.detach().numpy()
    cold_rows, warm_rows = sorted(cold), sorted(set(range(len(pos))) - cold)
    np.testing.assert_array_equal(bpr.item_factors[cold_rows], start[cold_rows])
    assert not bpr.item_bias[cold_rows].any()
    assert not np.allclose(bpr.item_factors[warm_rows], start[warm_rows])  # the check above could fail

    texts = data.item_texts
    pairs = text_pairs(data, cold_spec, config)
    assert pairs and not {p.item for p in pairs} & cold
    assert not [p for p in pairs for i in cold if texts[i] in p.history]

    rows, groups = fit_groups(data, cold_spec.ranker_negatives, seed=0)
    assert not set(groups.ravel().tolist()) & cold
    assert not {i for history in rows.histories for i in history} & cold
    assert not set(data.stage("valid").histories[0]) & cold
    simulated = simulated_cold(data, cold_spec, seed=0)
    assert len(simulated) and not set(simulated.tolist()) & cold


@pytest.fixture(scope="module")
def bundles(
    cold_spec: RankingSpec, cold_data: RankingData, config: TwoTowerConfig, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Recommender]:
    """The two-tower bundle (1 layer, a few steps) and the cold-start ranker over it."""
    root = tmp_path_factory.mktemp("cold-models")
    encoder = train_text_model(cold_data, cold_spec, config, root / "encoder", logging.getLogger(__name__))
    tables = item_tables(cold_data, cold_spec, Path(encoder.path), config, BPR_EPOCHS)
    items = catalogue(cold_data)
    write_bundle(root / "text", encoder_dir=root / "encoder", items=items, tables=tables, scorer="text",
                 text_lengths=LENGTHS)  # fmt: skip
    text = Recommender(root / "text", cold_spec.history_text)
    features = fit_features(cold_data, text, cold_spec.ranker_negatives, 0, cold_spec)
    ranker = fit_ranker(features, ALL_FEATURES)
    write_bundle(root / "ranker", encoder_dir=root / "encoder", items=items, tables=tables, scorer="ranker",
                 text_lengths=LENGTHS, ranker=ranker)  # fmt: skip
    return {"text": text, "ranker": Recommender(root / "ranker", cold_spec.history_text)}


def _cold_ranks(scores: np.ndarray, data: RankingData) -> tuple[np.ndarray, np.ndarray]:
    """Test ranks of the users whose target is cold, and the rank a random order would give them on average."""
    rows = data.stage("test")
    cold = cold_target_rows(rows.targets, data.cold_mask)
    ranks = target_ranks(scores, rows.targets, rows.excluded)[cold]
    chance = ((~rows.excluded[cold]).sum(axis=1) + 1) / 2
    return ranks, chance


def test_text_ranks_cold_targets_above_chance_and_peers_cannot(
    cold_data: RankingData, bundles: dict[str, Recommender]
) -> None:
    """The text model and the ranker place cold targets far above chance (the series name is in the
    title); popularity and item-kNN give a cold item 0, so it comes after every warm item they know."""
    rows = cold_data.stage("test")
    text_ranks, chance = _cold_ranks(bundles["text"].score_histories(rows.histories), cold_data)
    assert text_ranks.mean() < 0.5 * chance.mean(), (text_ranks.mean(), chance.mean())
    ranker_ranks, _ = _cold_ranks(bundles["ranker"].score_histories(rows.histories), cold_data)
    assert ranker_ranks.mean() < 0.5 * chance.mean(), (ranker_ranks.mean(), chance.mean())

    tables = bundles["text"].tables
    popularity = np.tile(tables.popularity, (len(rows.users), 1))
    pop_ranks, _ = _cold_ranks(popularity, cold_data)
    knn_ranks, _ = _cold_ranks(bl.item_knn_scores(tables.cooccurrence, rows.histories, 5), cold_data)
    ranker_ndcg = ranking_metrics(ranker_ranks, ("ndcg_at_10",))["ndcg_at_10"]
    for peer in (pop_ranks, knn_ranks):
        assert ranking_metrics(peer, ("ndcg_at_10",))["ndcg_at_10"] * 2 <= ranker_ndcg
        assert peer.mean() > ranker_ranks.mean()
    # the ranker leans on the text score where an item is cold: its weight on text_cold is positive
    weights = dict(zip(bundles["ranker"].ranker.features, bundles["ranker"].ranker.weights, strict=True))
    assert weights["text"] + weights["text_cold"] > 0, weights
