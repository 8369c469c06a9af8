"""The recommender's parts on hand-made inputs whose answers are worked out in the comments:
the stages every model reads, the ranker's features, the ranker (fit and exact reload from JSON),
the bundle's answers and errors, and the ranking gate with its baseline rule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from domainflow.catalog import get_domain
from domainflow.records import Evaluation, ModelRef
from domainflow.recsys import data, protocol
from domainflow.recsys.baselines import next_item_scores
from domainflow.recsys.bundle import Recommender, UnknownItemsError, write_bundle
from domainflow.recsys.dataset import RankingData, write_dataset
from domainflow.recsys.features import (
    FEATURES,
    ITEM_GRAPHS,
    ItemTables,
    cooccurrence_cosine,
    genre_matrix,
    history_features,
    keep_neighbours,
    parse_years,
    transition_probabilities,
)
from domainflow.recsys.gate import decide_ranking
from domainflow.recsys.ranker import LinearRanker, fit_ranker, sample_groups
from domainflow.registry import ModelRegistry
from tasks.deploy import apply_decision
from tests.data_helpers import replace
from tests.test_recommendation_protocol import ITEMS, SOURCES, hand_made


def write_hand_dataset(folder: Path) -> Path:
    """The hand-made interactions, split by the standard protocol, as a dataset folder."""
    clean, items, _ = data.validate(hand_made(), ITEMS, SOURCES)
    items["text"] = items["title"]
    split = protocol.leave_last_out(clean, 4.0, min_positives=3, catalogue=items["item_id"].tolist())
    write_dataset(folder, items, split, {})
    return folder


@pytest.fixture()
def hand_data(tmp_path: Path) -> RankingData:
    return RankingData.load(write_hand_dataset(tmp_path / "ds"))


def test_stages_by_hand(hand_data: RankingData) -> None:
    """a: i1(5) i2(3) | valid i3, test i4 (i5 came after). b: i2(5) i5(4), not evaluated.
    Fit targets are last train positives with an interaction before them: a's only train positive
    (i1) is its first interaction, so only b has one: i5, and b's base history is [i2]."""
    pos = hand_data.index.item_pos
    assert hand_data.fit_targets[["u", "i"]].values.tolist() == [[hand_data.index.user_pos["b"], pos["i5"]]]
    base = {(u, i) for u, i in hand_data.base_train()[["user_id", "item_id"]].itertuples(index=False)}
    assert base == {("a", "i1"), ("a", "i2"), ("b", "i2")}

    fit = hand_data.stage("fit")
    assert fit.histories == [[pos["i2"]]] and fit.targets.tolist() == [pos["i5"]]
    assert fit.excluded.tolist() == [[False, True, False, False, False]]
    valid, test = hand_data.stage("valid"), hand_data.stage("test")
    assert valid.histories == [[pos["i1"], pos["i2"]]] and valid.targets.tolist() == [pos["i3"]]
    assert test.histories == [[pos["i1"], pos["i2"], pos["i3"]]] and test.targets.tolist() == [pos["i4"]]
    assert test.excluded.tolist() == [[True, True, True, False, False]]  # the validation item is history at test time
    with pytest.raises(ValueError, match="stage must be one of"):
        hand_data.stage("train")


SEQUENCES = [[0, 1, 2], [0, 2], [1, 0, 3]]  # histories in time order (the transitions' source)


def small_tables(embeddings: np.ndarray | None = None) -> ItemTables:
    """4 items. Users {0,1}, {0,1,2}, {2}: item 0 and 1 share both their users (cosine 1), item 2
    shares one of two users with each (1/sqrt(2*2) = 0.5), item 3 has no users (0). Transitions from
    :data:`SEQUENCES`, window 2 with decay 0.5."""
    users, items = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 0, 1, 2, 2])
    genres, _ = genre_matrix(["a", "a", "b", "a|b"])
    return ItemTables(
        item_embeddings=np.eye(4, dtype=np.float32) if embeddings is None else embeddings,
        popularity=np.array([3.0, 0.0, 1.0, 0.0]),
        bpr_items=np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
        bpr_bias=np.array([0.0, 0.1, 0.2, 0.3]),
        cooccurrence=cooccurrence_cosine(users, items, 3, 4),
        genres=genres,
        years=parse_years(["1990", "1995", "2010", ""]),
        fold_in_reg=1.0,
        transitions=transition_probabilities(SEQUENCES, 4, window=2, decay=0.5),
        successors=transition_probabilities(SEQUENCES, 4),
    )


def test_transitions_by_hand() -> None:
    """Successors of item 0: 1 (next, in [0,1,2]), 2 (next in [0,2]; 2 steps later in [0,1,2]), 3 (next in
    [1,0,3]); item 3 never has a successor. Directed: 1 -> 0 once, 0 -> 1 once, 1 -> 2 once."""
    successors = transition_probabilities(SEQUENCES, 4).toarray()
    assert successors[0].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert successors[1].tolist() == pytest.approx([0.5, 0, 0.5, 0]) and not successors[3].any()
    table = transition_probabilities(SEQUENCES, 4, window=2, decay=0.5)
    windowed = table.toarray()
    # item 0: 1 (1), 2 (1 + 0.5), 3 (1) -> / 3.5; item 1: 2 (1), 0 (1), 3 (0.5) -> / 2.5
    assert windowed[0].tolist() == pytest.approx([0, 1 / 3.5, 1.5 / 3.5, 1 / 3.5])
    assert windowed[1].tolist() == pytest.approx([0.4, 0, 0.4, 0.2])
    assert not np.allclose(windowed, windowed.T)  # order matters, unlike co-occurrence
    # the most recent history item weighs 1, the one before RECENCY_DECAY (0.8): (1 * row 1 + 0.8 * row 0) / 1.8
    expected = (windowed[1] + 0.8 * windowed[0]) / 1.8
    assert next_item_scores(table, [0, 1]).tolist() == pytest.approx(expected.tolist())
    assert not next_item_scores(table, []).any()


def test_features_by_hand() -> None:
    tables = small_tables()
    assert np.allclose(tables.cooccurrence.toarray(), [[0, 1, 0.5, 0], [1, 0, 0.5, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]])
    user = np.array([0.0, 0.5, 0.25, 1.0], dtype=np.float32)
    got = dict(zip(FEATURES, history_features(tables, [0], user, np.array([1, 2, 3])).T, strict=True))
    assert got["text"].tolist() == [0.5, 0.25, 1.0]  # dot with one-hot item vectors
    assert got["log_popularity"].tolist() == pytest.approx(np.log1p([0.0, 1.0, 0.0]))
    # fold-in of [item 0 = (1, 0)] with ridge 1: solve([[2,0],[0,1]], [1,0]) = (0.5, 0); score = q·u + bias
    assert got["bpr"].tolist() == pytest.approx([1.0 + 0.1, 0.0 + 0.2, 0.0 + 0.3])
    assert got["cooc_recent"].tolist() == pytest.approx([1.0, 0.5, 0.0]) and got[
        "cooc_history"
    ].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert got["genre_match"].tolist() == pytest.approx([1.0, 0.0, 1 / np.sqrt(2)])  # profile (a) vs a / b / a|b
    assert got["year_gap"].tolist() == pytest.approx([0.5, 2.0, 0.0])  # decades from 1990; unknown year -> 0
    assert got["next_recent"].tolist() == pytest.approx([1 / 3.5, 1.5 / 3.5, 1 / 3.5])  # row 0 of the windowed table
    assert got["next_last"].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    empty = history_features(tables, [], user, np.array([1, 2]))  # a free-text history: text and popularity only
    assert empty[:, 2:].tolist() == [[0.0] * 7, [0.0] * 7] and empty[:, 0].tolist() == [0.5, 0.25]


def test_item_tables_round_trip(tmp_path: Path) -> None:
    tables = small_tables()
    tables.save(tmp_path / "tables.safetensors")
    again = ItemTables.load(tmp_path / "tables.safetensors")
    assert again.fold_in_reg == 1.0 and np.array_equal(again.cooccurrence.toarray(), tables.cooccurrence.toarray())
    assert np.isnan(again.years[3]) and again.years[:3].tolist() == [1990, 1995, 2010]
    assert again.transitions is not None and tables.transitions is not None
    assert np.array_equal(again.transitions.toarray(), tables.transitions.toarray())


def test_tables_of_a_bundle_written_dense_load_exactly(tmp_path: Path) -> None:
    """Bundles written before the item x item tables were sparse hold them as dense arrays under their plain
    names: they load into the same sparse tables, so an old ranker scores exactly as before."""
    from safetensors.numpy import save_file

    tables = small_tables()
    dense = {name: getattr(tables, name).toarray() for name in ITEM_GRAPHS}
    arrays = {
        name: np.asarray(getattr(tables, name), dtype=np.float32)
        for name in ("item_embeddings", "popularity", "bpr_items", "bpr_bias", "genres", "years", "cold")
    }
    save_file({**arrays, **dense, "fold_in_reg": np.array([1.0])}, str(tmp_path / "old.safetensors"))
    again = ItemTables.load(tmp_path / "old.safetensors")
    for name in ITEM_GRAPHS:
        assert sparse.issparse(getattr(again, name)) and np.array_equal(getattr(again, name).toarray(), dense[name])
    user = np.array([0.0, 0.5, 0.25, 1.0], dtype=np.float32)
    tables.save(tmp_path / "new.safetensors")  # both files hold float32 arrays
    new = ItemTables.load(tmp_path / "new.safetensors")
    assert np.array_equal(history_features(again, [0, 2], user), history_features(new, [0, 2], user))


def test_keep_neighbours_keeps_each_rows_largest_entries() -> None:
    table = sparse.csr_array(np.array([[0.0, 0.5, 0.2, 0.3], [0.1, 0.0, 0.0, 0.0], [0.4, 0.4, 0.0, 0.4]]))
    kept = keep_neighbours(table, 2).toarray()
    assert kept.tolist() == [[0.0, 0.5, 0.0, 0.3], [0.1, 0.0, 0.0, 0.0], [0.4, 0.4, 0.0, 0.0]]  # ties: first columns
    assert np.array_equal(keep_neighbours(table, None).toarray(), table.toarray())
    # the cut transitions stay probabilities of the whole row (not renormalised over the kept successors)
    cut = transition_probabilities(SEQUENCES, 4, window=2, decay=0.5, neighbours=1).toarray()
    assert cut[0].tolist() == pytest.approx([0, 0, 1.5 / 3.5, 0]) and (cut > 0).sum(axis=1).max() == 1


def test_item_tables_grow_with_interactions_not_with_the_catalogue_squared() -> None:
    """200,000 items and a million users: dense, the user x item marks alone would be 800 GB and each item x
    item table 160 GB. Sparse, a few interactions cost a few entries."""
    users, items = np.array([0, 0, 999_999, 999_999, 5]), np.array([7, 199_999, 7, 199_999, 7])
    cooccurrence = cooccurrence_cosine(users, items, 1_000_000, 200_000, neighbours=50)
    assert cooccurrence.shape == (200_000, 200_000) and cooccurrence.nnz == 2
    assert cooccurrence[7, 199_999] == pytest.approx(2 / np.sqrt(3 * 2))  # 2 shared users of 3 and 2
    successors = transition_probabilities([[7, 199_999], [199_999, 7, 3]], 200_000, window=2)
    assert successors.nnz == 4 and successors[199_999, 7] == pytest.approx(0.5)


def test_tables_without_transitions_load_but_cannot_feed_the_sequential_features(tmp_path: Path) -> None:
    """A bundle written before the sequential tables existed still loads (its ranker never reads them);
    asking it for ``next_recent`` says what is missing instead of scoring 0."""
    old = dataclasses.replace(small_tables(), transitions=None, successors=None)
    old.save(tmp_path / "tables.safetensors")
    again = ItemTables.load(tmp_path / "tables.safetensors")
    assert again.transitions is None
    user = np.zeros(4, dtype=np.float32)
    assert history_features(again, [0], user, names=FEATURES[:7]).shape == (4, 7)
    with pytest.raises(ValueError, match=r"need the item tables' transitions"):
        history_features(again, [0], user, names=FEATURES)


def test_ranker_learns_the_informative_feature_and_reloads_exactly(tmp_path: Path) -> None:
    """Targets have feature 0 one unit above their negatives on average; feature 1 is noise;
    feature 2 is constant. The fitted weight must be large on 0, small on 1, zero on 2."""
    rng = np.random.default_rng(0)
    groups = rng.normal(size=(300, 11, 3))
    groups[:, 0, 0] += 1.0
    groups[:, :, 2] = 7.0
    ranker = fit_ranker(groups, ("signal", "noise", "constant"))
    assert ranker.weights[0] > 0.5 and abs(ranker.weights[1]) < 0.2 and ranker.weights[2] == 0.0
    picked = (ranker.score(groups).argmax(axis=1) == 0).mean()
    assert picked > 2 / 11  # far better than chance among 11

    ranker.save(tmp_path / "ranker.json")
    payload = json.loads((tmp_path / "ranker.json").read_text())  # plain JSON, no pickle anywhere
    assert payload["format"] == "conditional_logit/1" and payload["features"] == ["signal", "noise", "constant"]
    again = LinearRanker.load(tmp_path / "ranker.json")
    assert (
        np.array_equal(again.weights, ranker.weights)
        and np.array_equal(again.mean, ranker.mean)
        and np.array_equal(again.scale, ranker.scale)
    )
    assert np.array_equal(again.score(groups), ranker.score(groups))  # bit for bit
    with pytest.raises(ValueError, match="unsupported ranker format"):
        LinearRanker.from_dict({**payload, "format": "pickle"})


def test_sample_groups_take_only_candidates() -> None:
    excluded = np.zeros((2, 6), dtype=bool)
    excluded[0, [1, 2]] = True
    groups = sample_groups(excluded, np.array([0, 5]), negatives=3, seed=1)
    assert groups[:, 0].tolist() == [0, 5]
    assert set(groups[0, 1:]) <= {3, 4, 5} and len(set(groups[0, 1:])) == 3  # never seen items, never the target
    assert 5 not in groups[1, 1:]
    with pytest.raises(ValueError, match="only 3 candidate items"):
        sample_groups(excluded, np.array([0, 5]), negatives=4, seed=1)


def test_bundle_answers_and_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A bundle with the real (2-layer) encoder and the hand tables above, scored by text only."""
    from domainflow.modeling import load_encoder
    from domainflow.recsys.two_tower import TwoTower, encode

    texts = ["Alpha (1990)", "Beta (1995)", "Gamma (2010)", "Delta"]
    encoder, tokenizer = load_encoder(str(tiny_model_dir))
    embeddings = encode(TwoTower(encoder), tokenizer, texts, 16)
    items = {"item_id": ["a", "b", "c", "d"], "title": ["Alpha", "Beta", "Gamma", "Delta"], "text": texts}
    spec = get_domain("recommendation")
    path = write_bundle(
        tmp_path / "bundle",
        encoder_dir=tiny_model_dir,
        items=items,
        tables=small_tables(embeddings),
        scorer="text",
        text_lengths={"history_max_length": 32, "item_max_length": 16, "history_items": 20},
    )
    recommender = Recommender(path, spec.history_text)

    ranked = recommender.recommend(history=["a"], k=10)
    assert [r.item_id for r in ranked if r.item_id == "a"] == []  # the history is not recommended back
    assert len(ranked) == 3 and [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    user = recommender.user_embeddings([[0]])[0]
    assert {r.item_id: r.score for r in ranked} == pytest.approx(
        {i: float(embeddings[j] @ user) for j, i in enumerate("abcd") if i != "a"}, abs=1e-5
    )
    assert [r.item_id for r in recommender.recommend(history=["a"], candidates=["d", "b"], k=5)] == sorted(
        ["d", "b"], key=lambda i: -float(embeddings["abcd".index(i)] @ user)
    )
    assert len(recommender.recommend(texts=["a film about Gamma"], k=2)) == 2  # free text alone is a history
    with pytest.raises(UnknownItemsError, match=r"history: unknown item id\(s\) 'zz', 'yy'"):
        recommender.recommend(history=["a", "zz", "yy"])
    with pytest.raises(UnknownItemsError, match="candidates: unknown item id"):
        recommender.recommend(history=["a"], candidates=["b", "nope"])
    with pytest.raises(ValueError, match="history: give at least one item id or text"):
        recommender.recommend()

    ranker_bundle = write_bundle(
        tmp_path / "ranked",
        encoder_dir=tiny_model_dir,
        items=items,
        tables=small_tables(embeddings),
        scorer="ranker",
        text_lengths={"history_max_length": 32, "item_max_length": 16, "history_items": 20},
        ranker=LinearRanker(FEATURES, np.zeros(len(FEATURES)), np.ones(len(FEATURES)), np.eye(len(FEATURES))[3]),
    )
    ranked_by = Recommender(ranker_bundle, spec.history_text)
    by_cooc = ranked_by.recommend(history=["a"], k=3)
    assert [r.item_id for r in by_cooc] == ["b", "c", "d"] and [r.score for r in by_cooc] == pytest.approx(
        [1.0, 0.5, 0.0]
    )  # weight only on cooc_recent
    # A history of free texts only has no collaborative features: the text model answers it.
    assert ranked_by.scorer_for(["a"]) == "ranker" and ranked_by.scorer_for([]) == "text"
    assert ranked_by.recommend(texts=["a film about Gamma"], k=4) == recommender.recommend(
        texts=["a film about Gamma"], k=4
    )
    assert not list(Path(ranker_bundle).rglob("*.pkl")) and not list(Path(ranker_bundle).rglob("*.bin"))
    # a ranker that reads the order features, in a bundle whose tables lack them (e.g. hand-assembled from an
    # older bundle's tables): refused at load, naming what is missing, rather than scoring those features 0
    old_tables = dataclasses.replace(small_tables(embeddings), transitions=None, successors=None)
    (Path(ranker_bundle) / "tables.safetensors").unlink()
    old_tables.save(Path(ranker_bundle) / "tables.safetensors")
    with pytest.raises(ValueError, match="the ranker reads .*next_recent.* has no transitions"):
        Recommender(ranker_bundle, spec.history_text)


USERS = 900


def ranks_hitting(users: list[int] | range) -> list[int]:
    """Test ranks of USERS users: rank 1 for ``users``, 100 (NDCG@10 0) for everyone else."""
    ranks = [100] * USERS
    for user in users:
        ranks[user] = 1
    return ranks


def evaluation(
    name: str,
    valid: float,
    hits: list[int] | range,
    compression: str | None = None,
    parent: str | None = None,
) -> tuple[Evaluation, list[int]]:
    """An evaluation whose test NDCG@10 is that of its per-user ranks (len(hits) / USERS)."""
    ranks = ranks_hitting(hits)
    test = len(hits) / USERS
    return Evaluation(
        candidate=ModelRef(name=name, path="/nonexistent", fingerprint=name, compression=compression, parent=parent),
        test_metrics={"ndcg_at_10": test, "hit_rate_at_10": test, "mrr": test},
        validation_metrics={"ndcg_at_10": valid},
        size_bytes=1,
        disk_bytes=1,
        parameters=1,
        report_dir="/nonexistent",
        texts_per_second_batch32=10.0,
    ), ranks


def test_ranking_gate_by_hand(tmp_path: Path) -> None:
    """900 users. The ranker finds the item of users 0-89 (NDCG@10 0.1). Popularity finds 0-29 and
    BPR 0-44: the ranker is never worse on a user, so both are wins. Item-kNN finds 0-79 and
    100-106: the ranker is better on 10 users and worse on 7, +0.0033 — a tie (interval ~±0.009),
    which blocks promotion. A baseline finding 0-149 beats the ranker: a loss."""
    from functools import partial

    spec = get_domain("recommendation")
    models = dict(
        [
            ("two_tower", evaluation("two_tower", 0.030, range(20))),
            ("ranker", evaluation("ranker", 0.080, range(90))),
            ("popularity", evaluation("popularity", 0.040, range(30))),
            ("bpr", evaluation("bpr", 0.060, range(45))),
            ("item_knn", evaluation("item_knn", 0.070, [*range(80), *range(100, 107)])),
            ("strong", evaluation("strong", 0.070, range(150))),
        ]
    )
    ranks = {name: r for name, (_, r) in models.items()}
    candidates = [models["two_tower"][0], models["ranker"][0]]
    baselines = [models["popularity"][0], models["bpr"][0]]

    first = decide_ranking(spec, candidates, None, baselines=baselines, test_ranks=ranks)
    assert first.promote and first.chosen == "ranker"  # chosen on validation, gated on test
    assert first.gates["baselines"] == {"popularity": 30 / USERS, "bpr": 0.05}
    assert first.gates["baseline_comparisons"]["bpr"]["verdict"] == "win"
    assert first.gates["baseline_comparisons"]["bpr"]["mean"] == pytest.approx(0.1 - 0.05)
    reasons = " ".join(first.verdict("ranker").reasons)
    assert "beats baseline bpr: ndcg_at_10 0.1000 vs 0.0500, difference +0.0500 [+0.03" in reasons
    assert first.verdict("bpr").role == "baseline" and not first.verdict("bpr").eligible
    assert "It beats every baseline outside the 95% CI" in first.summary

    close = [*baselines, models["item_knn"][0]]
    second = decide_ranking(spec, candidates, None, baselines=close, test_ranks=ranks)
    assert not second.promote and second.chosen == "ranker"
    comparison = second.gates["baseline_comparisons"]["item_knn"]
    assert comparison["verdict"] == "tie" and comparison["low"] < 0 < comparison["mean"] == pytest.approx(3 / USERS)
    assert second.summary.startswith(
        "Nothing promoted for recommendation: challenger ranker is not shown to beat every baseline: it ties "
        "baseline item_knn (ndcg_at_10 0.1000 vs 0.0967, difference +0.0033 ["
    )
    assert "ties baseline item_knn" in " ".join(second.verdict("ranker").reasons)

    third = decide_ranking(
        spec, candidates, {"ndcg_at_10": 0.11}, champion_version=3, baselines=baselines, test_ranks=ranks
    )
    assert not third.promote and "worse than champion v3" in " ".join(third.verdict("ranker").reasons)
    fourth = decide_ranking(spec, candidates, None, baselines=[models["strong"][0]], test_ranks=ranks)
    assert not fourth.promote and "loses to baseline strong" in fourth.summary

    # Through the deploy path: a rejection is recorded with its numbers and intervals, nothing is promoted.
    registry = ModelRegistry("rec_gate_test", root=tmp_path / "registry")
    result = apply_decision(
        spec,
        candidates,
        None,
        "data-fp",
        "test-fp",
        {},
        registry=registry,
        decide_fn=partial(decide_ranking, baselines=close, test_ranks=ranks),
    )
    assert result["version"] is None and registry.champion() is None
    stored = json.loads(Path(result["decision_file"]).read_text())
    assert stored["promote"] is False and stored["gates"]["baselines"]["item_knn"] == pytest.approx(87 / USERS)
    assert stored["gates"]["baseline_comparisons"]["item_knn"]["verdict"] == "tie"
    assert [e["event"] for e in registry.history()] == ["rejection"]

    with pytest.raises(ValueError, match="at least one evaluated baseline"):
        decide_ranking(spec, candidates, None, baselines=[], test_ranks=ranks)
    with pytest.raises(ValueError, match="needs the per-user test ranks of 'popularity'"):
        decide_ranking(spec, candidates, None, baselines=baselines, test_ranks={"ranker": ranks["ranker"]})
    with pytest.raises(ValueError, match="the test ranks of 'ranker' give ndcg_at_10 0.050000, but its evaluation"):
        decide_ranking(spec, candidates, None, baselines=baselines, test_ranks={**ranks, "ranker": ranks["bpr"]})
    int8, int8_ranks = evaluation("ranker-int8", 0.080, range(89), compression="dynamic_int8", parent="ranker")
    compressed = [*candidates, int8.model_copy(update={"texts_per_second_batch32": 14.0})]
    decision = decide_ranking(
        replace(spec), compressed, None, baselines=baselines, test_ranks={**ranks, "ranker-int8": int8_ranks}
    )
    assert decision.chosen == "ranker-int8" and decision.promote  # within budget, 1.4x faster


def test_baseline_report_folders_key_on_what_shapes_the_baselines() -> None:
    """Two runs that differ in a field shaping a baseline's ranks must not share (and overwrite) a report folder:
    the cap on the item tables' neighbours changes item_knn's and next_item's tables, the fold-in ridge BPR
    fold-in's scores; a field that shapes nothing (the description) keeps the folder."""
    from tasks.rank_evaluate import baseline_report_key

    spec = get_domain("recommendation")
    key = baseline_report_key(spec, "dataset", "baselines")
    changed = {
        "item_neighbours": replace(spec, item_neighbours=200),
        "fold_in_reg": replace(spec, bpr=replace(spec.bpr, fold_in_reg=2.0)),
        "metrics": replace(spec, metrics=("ndcg_at_10",)),
    }
    for field, other in changed.items():
        assert baseline_report_key(other, "dataset", "baselines") != key, field
    assert baseline_report_key(spec, "another split", "baselines") != key
    assert baseline_report_key(replace(spec, description="another text"), "dataset", "baselines") == key
