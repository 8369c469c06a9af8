"""The ranking pipeline end to end on the invented film series (tests/recsys_helpers.py) with the real
MiniLM cut to two layers, then its champion behind ``POST /v1/{domain}/rank`` on a real uvicorn server.

One registry for the module, so each step sees what the earlier one left: a first run that deploys,
an identical rerun served from the cache that keeps the champion, a bad file that stops before
training, and the served champion answering like ``domainflow recommend``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

import tasks.rank_evaluate
import tasks.rank_train
from domainflow import settings
from domainflow.catalog import get_domain
from domainflow.recsys.bundle import Recommender
from domainflow.recsys.dataset import RankingData
from domainflow.recsys.features import ITEM_GRAPHS, ItemTables
from domainflow.recsys.protocol import ranking_metrics, target_ranks
from domainflow.recsys.two_tower import TwoTower, encode
from domainflow.registry import ModelRegistry
from flows.cli import app
from flows.pipeline import pipeline_for
from serving import ApiKeys, ServingConfig, create_app
from tests.process_helpers import ThreadedUvicorn
from tests.recsys_helpers import SERIES_NEIGHBOURS, items_rows, register_series_domain, write_series_data
from tests.test_serving import KEY

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt")


def _fail_if_called(name: str):
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{name} ran although its result should have come from the cache")

    return fail


def _snapshot(root: Path) -> dict[str, str]:
    return (
        {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        if root.exists()
        else {}
    )


def _ndcg_by_hand(ranks: list[int]) -> float:
    return float(np.mean([1 / np.log2(r + 1) if r <= 10 else 0.0 for r in ranks]))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    domain = register_series_domain()
    data_dir = write_series_data(tmp_path_factory.mktemp("series-data"))
    return {"domain": domain, "model": str(tiny_model_dir), "data_dir": str(data_dir), "seed": 7}


@pytest.fixture(scope="module")
def first_run(series: dict[str, Any]) -> dict[str, Any]:
    return pipeline_for(series["domain"])(**series)


def test_first_run_deploys_a_ranker_that_beats_the_baselines(first_run: dict[str, Any], series: dict[str, Any]) -> None:
    domain = series["domain"]
    decision = first_run["decision"]
    assert decision["promote"] is True and first_run["version"] == 1, decision["summary"]
    rows = {row["candidate"]: row for row in first_run["candidates"]}
    baselines = get_domain(domain).baselines  # popularity, bpr, bpr_fold_in (see register_series_domain)
    assert baselines == ("popularity", "bpr", "bpr_fold_in")
    assert set(rows) == {*baselines, "two_tower", "ranker", "ranker-int8"}
    assert {rows[name]["role"] for name in baselines} == {"baseline"}
    chosen = rows[decision["chosen"]]
    assert decision["chosen"] in {"ranker", "ranker-int8"} and chosen["chosen"]
    # The series structure: the next episode is predictable from the last ones watched (ranker),
    # the series but not the episode from the set watched (BPR), neither from popularity.
    for baseline in ("popularity", "bpr"):
        assert chosen["test_ndcg_at_10"] > rows[baseline]["test_ndcg_at_10"] + 0.05, rows
    for baseline in baselines:  # each a win: the paired 95% interval over users lies above 0
        assert f"beats baseline {baseline}" in chosen["reasons"], chosen["reasons"]
        assert decision["gates"]["baseline_comparisons"][baseline]["low"] > 0
    assert rows["bpr"]["test_ndcg_at_10"] > rows["popularity"]["test_ndcg_at_10"]
    assert rows["ranker-int8"]["test_ndcg_at_10"] == pytest.approx(rows["ranker"]["test_ndcg_at_10"], abs=0.01)

    # Every number is the metric of the stored ranks (recomputed here by hand).
    data = RankingData.load(first_run["dataset"]["path"])
    reports = {report.name.rsplit("-", 1)[0]: report for report in (settings.runs_dir() / domain / "reports").iterdir()}
    for name, row in rows.items():
        ranks = json.loads((reports[name] / "ranks.json").read_text())
        assert len(ranks["test"]) == len(data.holdout) == first_run["dataset"]["evaluated_users"]
        assert row["test_ndcg_at_10"] == pytest.approx(_ndcg_by_hand(ranks["test"]), abs=1e-12)
        assert row["validation_ndcg_at_10"] == pytest.approx(_ndcg_by_hand(ranks["valid"]), abs=1e-12)

    # The registry holds a loadable, pickle-free bundle with its decision, lineage and model card.
    champion = ModelRegistry(domain).champion()
    assert champion is not None and champion.version == 1
    files = {p.relative_to(champion.model_dir).as_posix() for p in champion.model_dir.rglob("*") if p.is_file()}
    assert {"recommender.json", "ranker.json", "items.json", "tables.safetensors", "encoder/model.safetensors"} <= files
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    tables = ItemTables.load(champion.model_dir / "tables.safetensors")  # cut to the domain's item_neighbours
    for name in ITEM_GRAPHS:
        per_item = np.diff(getattr(tables, name).indptr)
        assert per_item.max() <= SERIES_NEIGHBOURS, name
    assert np.diff(tables.cooccurrence.indptr).max() == SERIES_NEIGHBOURS  # the cap did cut something
    assert champion.decision["gates"]["baselines"] == {name: rows[name]["test_ndcg_at_10"] for name in baselines}
    card = champion.model_card.read_text()
    assert get_domain(domain).protocol in card and "| bpr | baseline |" in card and "| popularity | baseline |" in card
    assert champion.lineage["test_fingerprint"] == first_run["dataset"]["test_fingerprint"]

    # Reloaded from the registry (int8 re-applied if chosen), it scores exactly what was evaluated.
    recommender = Recommender(champion.model_dir, get_domain(domain).history_text)
    test = data.stage("test")
    metrics = ranking_metrics(target_ranks(recommender.score_histories(test.histories), test.targets, test.excluded))
    assert metrics == pytest.approx(champion.metrics["test"], abs=1e-12)


def test_two_tower_training_lowered_its_loss_and_beat_the_untrained_encoder(
    first_run: dict[str, Any], series: dict[str, Any]
) -> None:
    two_tower = next(row for row in first_run["candidates"] if row["candidate"] == "two_tower")
    (bundle,) = [
        p
        for p in (settings.runs_dir() / series["domain"] / "models").glob("two_tower-*")
        if not p.name.endswith(".partial")
    ]
    training = json.loads((bundle / "encoder" / "training.json").read_text())
    losses = training["losses"]
    assert training["steps"] == len(losses) == 8  # 128 pairs, batches of 32, 2 epochs
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses

    # The same validation users scored by the untrained encoder (no lexical overlap between titles).
    from domainflow.modeling import load_encoder

    spec = get_domain(series["domain"])
    data = RankingData.load(first_run["dataset"]["path"])
    valid = data.stage("valid")
    encoder, tokenizer = load_encoder(series["model"])
    tower = TwoTower(encoder)
    items = encode(tower, tokenizer, data.item_texts, spec.item_max_length)
    users = encode(
        tower,
        tokenizer,
        [spec.history_text([data.item_texts[i] for i in h]) for h in valid.histories],
        spec.history_max_length,
    )
    untrained = ranking_metrics(target_ranks(users @ items.T, valid.targets, valid.excluded))["ndcg_at_10"]
    assert two_tower["validation_ndcg_at_10"] > untrained + 0.05, (two_tower["validation_ndcg_at_10"], untrained)


def test_identical_rerun_is_cached_and_a_tie_keeps_the_champion(
    first_run: dict[str, Any], series: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for module, name in (
        (tasks.rank_train, "train_text_model"),
        (tasks.rank_train, "fit_baselines"),
        (tasks.rank_evaluate, "evaluate_bundles"),
    ):
        monkeypatch.setattr(module, name, _fail_if_called(name))
    args = ["run", series["domain"], "--model", series["model"], "--data-dir", series["data_dir"], "--seed", "7"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ties it within tolerance" in result.output and "baseline" in result.output
    registry = ModelRegistry(series["domain"])
    assert registry.champion().version == 1
    assert [e["event"] for e in registry.history()][-1] == "rejection"


def test_bad_data_stops_before_training(first_run: dict[str, Any], series: dict[str, Any], tmp_path: Path) -> None:
    bad = write_series_data(tmp_path / "bad", num_users=12)
    rows = (bad / "interactions.csv").read_text().splitlines()
    rows[3] = rows[3].replace(rows[3].split(",")[1], "m99")  # line 4: an item the catalogue lacks
    (bad / "interactions.csv").write_text("\n".join(rows) + "\n")
    before = _snapshot(settings.registry_dir() / series["domain"])
    result = CliRunner().invoke(app, ["run", series["domain"], "--model", series["model"], "--data-dir", str(bad)])
    assert result.exit_code == 3  # bad data
    assert "item_id not found in" in result.output and "line 4 ('m99')" in result.output
    assert _snapshot(settings.registry_dir() / series["domain"]) == before
    ignored = CliRunner().invoke(app, ["run", series["domain"], "--train-file", "x.csv", "--test-file", "y.csv"])
    assert ignored.exit_code == 2 and "--data-dir" in ignored.output


@pytest.fixture(scope="module")
def rank_server(first_run: dict[str, Any], series: dict[str, Any]) -> Any:
    server = ThreadedUvicorn(
        create_app(
            ServingConfig(registry_root=settings.registry_dir(), domains=(series["domain"],)), api_keys=ApiKeys([KEY])
        )
    )
    server.start()
    yield server
    server.stop()


def test_rank_endpoint_answers_like_the_cli(rank_server: Any, series: dict[str, Any]) -> None:
    domain = series["domain"]
    titles = {row["item_id"]: row["title"] for row in items_rows()}
    history = ["m01", "m02", "m03", "m04", "m05"]  # five episodes of series 1: next is m06
    with httpx.Client(base_url=rank_server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
        assert httpx.post(f"{rank_server.url}/v1/{domain}/rank", json={"history": history}).status_code == 401

        response = client.post(f"/v1/{domain}/rank", json={"history": history, "top_k": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["domain"], body["version"], body["scorer"]) == (domain, 1, "ranker")
        items = body["items"]
        assert [i["item_id"] for i in items][0] == "m06" and len(items) == 3
        assert not set(history) & {i["item_id"] for i in items}
        assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
        assert all(i["title"] == titles[i["item_id"]] for i in items)

        restricted = client.post(
            f"/v1/{domain}/rank", json={"history": history, "candidates": ["m20", "m06", "m33"], "top_k": 10}
        ).json()["items"]
        assert [i["item_id"] for i in restricted][0] == "m06" and {i["item_id"] for i in restricted} == {
            "m20",
            "m06",
            "m33",
        }
        free = client.post(f"/v1/{domain}/rank", json={"history_texts": ["an evening of invented films"], "top_k": 2})
        assert (
            free.status_code == 200 and len(free.json()["items"]) == 2 and free.json()["scorer"] == "text"
        )  # no catalogue item: the text model answers

        def message(payload: Any) -> str:
            answer = client.post(f"/v1/{domain}/rank", json=payload)
            assert answer.status_code == 422, (payload, answer.text)
            return answer.json()["message"]

        assert "history is empty" in message({})
        assert "history is empty" in message({"history": [], "history_texts": []})
        assert message({"history": ["m01", "zz9", "m02"]}) == "history: unknown item id(s) 'zz9'"
        assert message({"history": ["m01"], "candidates": ["m02", "nope"]}) == "candidates: unknown item id(s) 'nope'"
        assert "topk" in message({"history": ["m01"], "topk": 3})  # a typo is refused, not ignored
        assert "top_k" in message({"history": ["m01"], "top_k": 0})
        assert "text is empty" in message({"history_texts": ["  "]})
        assert "history" in message({"history": "m01"})

        wrong = client.post(f"/v1/{domain}/predict", json={"texts": ["hello"]})
        assert wrong.status_code == 404 and f"use /v1/{domain}/rank" in wrong.json()["detail"]
        status = client.get("/v1/domains").json()["domains"]
        assert [(s["domain"], s["status"], s["version"]) for s in status] == [(domain, "serving", 1)]

    cli = CliRunner().invoke(app, ["recommend", domain, *history, "--top-k", "3"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout)
    assert [i["item_id"] for i in printed["items"]] == [i["item_id"] for i in items]
    assert [i["score"] for i in printed["items"]] == pytest.approx([i["score"] for i in items], abs=1e-4)
    unknown = CliRunner().invoke(app, ["recommend", domain, "zz9"])
    assert unknown.exit_code == 2 and "unknown item id(s) 'zz9'" in unknown.output
