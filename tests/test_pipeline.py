"""The whole flow end to end on real Banking77 rows with the real MiniLM cut to two layers.

One sequence of runs in one registry, so each run sees what the earlier one left:
a crash mid-way, a resumed run that deploys, an identical rerun served from the
cache, and two bad data files that must stop before training and change nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

import tasks.evaluate
import tasks.finetune
import tasks.ingest
from domainflow.catalog import get_domain
from domainflow.modeling import load_classifier, predict_logits, predict_proba, read_metadata
from domainflow.registry import ModelRegistry
from domainflow.retrieval import QuestionIndex
from flows.cli import app
from flows.pipeline import domain_pipeline
from serving import ApiKeys, ServingConfig, create_app
from serving.inference import score_texts
from tests.conftest import TINY_LABELS
from tests.data_helpers import banking77_slice, write_csv
from tests.file_checks import assert_no_pickles
from tests.process_helpers import ThreadedUvicorn, task_states, wait_for

CHANCE = 1 / len(TINY_LABELS)  # six balanced intents: what a model with random or collapsed weights scores
#: How much test accuracy each compression may lose against its fp32 parent. Measured on this run's 72 test
#: texts (parent 0.986): int8 0.986, magnitude pruning 0.986, FFN pruning + recovery 0.958, the distilled
#: one-layer student 0.972 (and 0.972 in int8). A broken step lands near CHANCE, far outside any of these.
MAX_DROP = {
    "onnx_int8": 0.03,
    "magnitude_prune_0.5": 0.05,
    "ffn_prune_0.5": 0.10,
    "distill_l1": 0.10,
    "distill_l1+onnx_int8": 0.10,
    "cascade": 0.10,  # within its margin of the reference's int8 copy on validation (14 texts), so near the student
}
KEY = "pipeline-champion-key-5e1d7c3b"


def _fail_if_called(name: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran although its result should have come from the cache")

    return fail


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash during fine-tuning")


def _registry_snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _training_loss(model_dir: str, dataset_path: str) -> float:
    """Mean cross-entropy of a model on the training split: the quantity fine-tuning minimises."""
    from datasets import load_from_disk

    train = load_from_disk(dataset_path)["train"]
    logits = predict_logits(load_classifier(model_dir), list(train["text"]))
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(train["label"])))


@pytest.fixture(scope="module")
def run_args(tiny_domain: str, tiny_model_dir: Path, tiny_data_dir: Path) -> dict:
    return {
        "domain": tiny_domain,
        "model": str(tiny_model_dir),
        "data_dir": str(tiny_data_dir),
        "epochs": 2.0,
        "seed": 7,
    }


def test_crash_resume_deploy_and_cache(run_args: dict, monkeypatch: pytest.MonkeyPatch, session_home: Path) -> None:
    domain = run_args["domain"]
    registry = ModelRegistry(domain)

    # 1. A run that dies during fine-tuning deploys nothing.
    with monkeypatch.context() as patch:
        patch.setattr(tasks.finetune, "finetune_classifier", _crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            domain_pipeline(**run_args)
    assert registry.champion() is None

    # 2. The rerun resumes: ingestion and the probe come from the cache, the rest runs and deploys.
    with monkeypatch.context() as patch:
        patch.setattr(tasks.ingest, "ingest_dataset", _fail_if_called("ingest_dataset"))
        patch.setattr(tasks.finetune, "train_linear_probe", _fail_if_called("train_linear_probe"))
        first = domain_pipeline(**run_args)
    decision = first["decision"]
    assert decision["promote"] is True, decision["summary"]
    assert first["version"] == 1
    champion = registry.champion()
    assert champion is not None and champion.version == 1
    names = {row["candidate"] for row in first["candidates"]}
    reference = "finetuned" if "finetuned-onnx-int8" in names else "linear_probe"
    assert names == {
        "linear_probe",
        "finetuned",
        f"{reference}-onnx-int8",
        f"{reference}-sparse50",
        f"{reference}-ffn50",
        "distilled-l1",
        "distilled-l1-onnx-int8",
        "cascade-distilled-l1-onnx-int8",
    }
    for row in first["candidates"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["texts_per_second_batch32"] > 0 and row["size_mb"] > 0

    # The champion really works: six intents, better than chance by a wide margin.
    test_rows = banking77_slice(
        "test",
        [
            "card_arrival",
            "lost_or_stolen_card",
            "exchange_rate",
            "top_up_failed",
            "pin_blocked",
            "cash_withdrawal_charge",
        ],
        12,
    )
    loaded = load_classifier(champion.model_dir)
    predicted = predict_proba(loaded, [r["text"] for r in test_rows]).argmax(dim=1)
    accuracy = sum(
        loaded.label_names[int(p)] == r["category"] for p, r in zip(predicted, test_rows, strict=True)
    ) / len(test_rows)
    assert accuracy >= 0.5
    assert accuracy == pytest.approx(
        champion.metrics["test"]["accuracy"] if "test" in champion.metrics else accuracy, abs=1e-9
    )

    # The run's report exists: metrics, per-class table, confusion matrix, model card.
    for ev_row in first["candidates"]:
        assert ev_row["reasons"]  # every candidate's verdict says why
    assert sum(row["chosen"] for row in first["candidates"]) == 1
    reports = [
        r for r in (session_home / "runs" / domain / "reports").iterdir() if not r.name.startswith("compression-")
    ]
    assert len(reports) == len(first["candidates"])
    assert all((r / "model_card.md").is_file() and (r / "confusion_matrix.png").is_file() for r in reports)
    # this run's compression report (other tests of the session write reports for the same domain)
    reports_of_domain = [
        json.loads(path.read_text())
        for path in (session_home / "runs" / domain / "reports").glob("compression-*/compression_report.json")
    ]
    compression = next(rows for rows in reports_of_domain if {row["candidate"] for row in rows} == names)
    by_name = {row["candidate"]: row for row in compression}
    # The cascade's threshold curve (drawn in the speed-vs-quality plot): at 0 it is its fast model alone, above 1
    # its strong model alone, each as this run measured them on the same test texts.
    rows = {row["candidate"]: row for row in first["candidates"]}
    cascade = "cascade-distilled-l1-onnx-int8"
    fusions = [json.loads((r / "metrics.json").read_text()) for r in reports]
    fusion = next(
        m["fusion"]
        for m in fusions
        if m["candidate"]["name"] == cascade
        and m["test"]["accuracy"] == pytest.approx(rows[cascade]["test_accuracy"], abs=1e-4)
    )
    curve = fusion["curve"]
    assert curve[0]["passed_on"] == 0.0 and curve[-1]["passed_on"] == 1.0
    assert curve[0]["accuracy"] == pytest.approx(rows[fusion["fast"]]["test_accuracy"], abs=1e-4)
    assert curve[-1]["accuracy"] == pytest.approx(rows[fusion["strong"]]["test_accuracy"], abs=1e-4)
    assert by_name[f"{reference}-sparse50"]["zeros"] >= 0.45  # half the encoder weights are zero …
    assert (
        by_name[f"{reference}-sparse50"]["parameters"] == by_name[reference]["parameters"]
    )  # … but nothing got smaller
    assert by_name[f"{reference}-ffn50"]["parameters"] < by_name[reference]["parameters"]
    assert by_name["distilled-l1"]["parameters"] < by_name[reference]["parameters"]
    assert by_name[f"{reference}-onnx-int8"]["weights_mb"] < by_name[reference]["weights_mb"] / 3
    assert by_name[f"{reference}-onnx-int8"]["parameters"] == by_name[reference]["parameters"]
    assert by_name["distilled-l1-onnx-int8"]["disk_mb"] < by_name["distilled-l1"]["disk_mb"]
    card = (Path(champion.path) / "model_card.md").read_text()
    assert "Compression report of this run" in card and "distilled-l1-onnx-int8" in card
    # The domain's retrieval fallback ships with the champion: its index, and its figures in the card.
    assert {"retrieval.safetensors", "retrieval.json"} <= {p.name for p in champion.model_dir.iterdir()}
    assert "Answer policy on the test set" in card
    chosen = next(row["candidate"] for row in first["candidates"] if row["chosen"])
    policy = json.loads(
        next(r for r in reports if r.name.rsplit("-", 1)[0] == chosen).joinpath("metrics.json").read_text()
    )["answer_policy"]
    assert policy["answered_confidently"] + policy["answered_by_retrieval"] + policy["escalated"] == pytest.approx(1.0)
    assert policy["escalated"] <= policy["escalated_without_retrieval"]
    if champion.lineage["compression"]:  # the registry remembers where a compressed champion's fp32 parent is
        assert Path(champion.lineage["parent_path"]).name.startswith(champion.lineage["parent"])

    # Fine-tuning learns: well above chance, not worse than the probe it starts from, and its training loss
    # fell from the probe's (measured: 0.130 -> 0.077; a fine-tune that trains nothing keeps 0.130).
    rows = {row["candidate"]: row for row in first["candidates"]}
    probe, tuned = rows["linear_probe"], rows["finetuned"]
    assert tuned["test_accuracy"] >= max(0.8, 4 * CHANCE) and tuned["validation_accuracy"] >= 0.7, tuned
    assert tuned["test_accuracy"] >= probe["test_accuracy"] - 0.05, (tuned, probe)
    model_paths = {
        metrics["candidate"]["name"]: metrics["candidate"]["path"]
        for metrics in (json.loads((r / "metrics.json").read_text()) for r in reports)
    }
    assert read_metadata(model_paths["finetuned"])["init"] == model_paths["linear_probe"]  # the loss it started at
    probe_loss = _training_loss(model_paths["linear_probe"], first["dataset"]["path"])
    tuned_loss = _training_loss(model_paths["finetuned"], first["dataset"]["path"])
    assert tuned_loss < 0.85 * probe_loss, (tuned_loss, probe_loss)
    # Each compressed candidate keeps most of its parent's accuracy (bounds in MAX_DROP, from measured values).
    compressed = {name: row for name, row in rows.items() if row["compression"]}
    assert set(MAX_DROP) == {row["compression"] for row in compressed.values()}
    for row in compressed.values():
        parent = rows[row["parent"]]
        assert row["test_accuracy"] >= parent["test_accuracy"] - MAX_DROP[row["compression"]], (row, parent)
        assert row["test_accuracy"] >= 0.75, row
    assert rows["distilled-l1-onnx-int8"]["test_accuracy"] >= rows["distilled-l1"]["test_accuracy"] - 0.03
    # The cascade: the int8 student in front of the reference's int8 copy, threshold calibrated on validation,
    # the share of test texts it passed on measured as it ran.
    cascade_metrics = json.loads(
        next(r for r in reports if r.name.startswith("cascade-")).joinpath("metrics.json").read_text()
    )["fusion"]
    assert cascade_metrics["fast"] == "distilled-l1-onnx-int8" and cascade_metrics["strong"] == f"{reference}-onnx-int8"
    assert 0.0 <= cascade_metrics["threshold"] <= 1.0 + 1e-6 and 0.0 <= cascade_metrics["test_passed_on"] <= 1.0
    assert cascade_metrics["calibration"]["validation_passed_on"] <= 0.5 or not cascade_metrics["calibration"]["met"]

    # 3. An identical rerun: every step is cached, and the tie keeps the champion.
    with monkeypatch.context() as patch:
        for module, name in [
            (tasks.ingest, "ingest_dataset"),
            (tasks.finetune, "train_linear_probe"),
            (tasks.finetune, "finetune_classifier"),
            (tasks.evaluate, "evaluate_candidate"),
        ]:
            patch.setattr(module, name, _fail_if_called(name))
        state = domain_pipeline(**run_args, return_state=True)
    second = state.result()
    assert second["decision"]["promote"] is False
    assert "tie" in second["decision"]["summary"].lower() or "not better" in second["decision"]["summary"].lower()
    assert registry.champion().version == 1
    states = task_states(state.state_details.flow_run_id)
    for step in (
        "ingest",
        "linear-probe",
        "finetune",
        "evaluate",
        "quantize",
        "prune-magnitude",
        "prune-ffn",
        "distill",
        "cascade",
        "measure-speed",
    ):
        assert set(states.get(step, ["Cached"])) == {"Cached"}, states
    assert states.get("deploy") == ["Completed"]


def test_the_pipelines_champion_answers_over_http_as_the_model_itself(run_args: dict, session_home: Path) -> None:
    """The champion the run above promoted (int8 ONNX + retrieval index), served by the real app on a real
    uvicorn: each answer is the champion's own prediction on the same texts (loaded from its registry folder
    and scored by the service's inference function), the right intent for nearly every test text, with the
    domain's reply or escalation and, for an unsure text, the nearest known question from the shipped index."""
    domain = run_args["domain"]
    champion = ModelRegistry(domain).champion()
    if champion is None:
        pytest.skip("needs the champion promoted by test_crash_resume_deploy_and_cache (run the whole module)")
    assert (champion.model_dir / "model.int8.onnx").is_file() == champion.lineage["candidate"].endswith("onnx-int8")
    spec = get_domain(domain)
    answers, retrieval = spec.answers, spec.retrieval
    assert retrieval is not None
    rows = banking77_slice("test", TINY_LABELS, 12)[::3]  # 4 test texts per intent
    texts = [row["text"] for row in rows] + [
        "Can you recommend a good pizza place?",  # nothing to do with banking: unsure, escalated with a hint
        "hello",
    ]
    config = ServingConfig(registry_root=session_home / "registry", domains=(domain,))
    # The model's own answers: its folder loaded as any model is, scored as one batch the way the service scores
    # a request (an int8 graph quantizes activations per pass, so its numbers depend on the texts beside them).
    loaded, index = load_classifier(champion.model_dir), QuestionIndex.load(champion.model_dir)
    own = score_texts(loaded, index, spec, texts, config.max_top_k)

    server = ThreadedUvicorn(create_app(config, api_keys=ApiKeys([KEY]))).start()
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
            wait_for(lambda: client.get(f"/readyz/{domain}").status_code == 200, "the champion to load", timeout=120)
            response = client.post(f"/v1/{domain}/predict", json={"texts": texts, "top_k": 3})
            (status,) = client.get("/v1/domains").json()["domains"]
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["domain"], body["version"], len(body["predictions"])) == (domain, champion.version, len(texts))
    assert (status["version"], status["candidate"], status["status"]) == (
        champion.version,
        champion.lineage["candidate"],
        "serving",
    )

    actions = []
    for text, prediction, scores in zip(texts, body["predictions"], own, strict=True):
        assert [p["label"] for p in prediction["top_k"]] == list(scores.labels[:3]), text
        assert [p["score"] for p in prediction["top_k"]] == pytest.approx(scores.scores[:3], abs=1e-4), text
        assert (prediction["label"], prediction["score"]) == (
            prediction["top_k"][0]["label"],
            prediction["top_k"][0]["score"],
        )
        nearest = scores.nearest
        assert (nearest is not None) == (scores.scores[0] < retrieval.consult_below), text  # unsure texts only
        if nearest is not None:  # the index's nearest known question goes along
            sent = prediction["nearest_question"]
            assert (sent["question"], sent["label"], sent["close_enough"]) == (
                nearest.question,
                nearest.label,
                nearest.close_enough,
            ), text
            assert sent["similarity"] == pytest.approx(nearest.similarity, abs=1e-3)
        else:
            assert prediction.get("nearest_question") is None, text
        if scores.scores[0] >= answers.confidence_threshold:
            expected = ("reply", answers.replies[prediction["label"]])
        elif nearest is not None and nearest.close_enough:
            expected = ("reply_from_similar_question", answers.replies[nearest.label])
        else:
            expected = ("escalate", answers.escalation_reply)
        assert (prediction["action"], prediction["reply"]) == expected, text
        actions.append(prediction["action"])
    right = sum(p["label"] == row["category"] for p, row in zip(body["predictions"], rows, strict=False))
    assert right >= 0.85 * len(rows), f"{right}/{len(rows)} test texts served with their intent"  # measured: 23 of 24
    assert actions.count("reply") >= len(rows) // 2, actions  # a champion this accurate answers most itself
    assert set(actions) & {"escalate", "reply_from_similar_question"}, actions


def test_no_file_the_runs_wrote_is_a_pickle(session_home: Path) -> None:
    """Every file in the home after the runs above (registry, run outputs, Prefect results, caches):
    safetensors, ONNX protobufs, JSON, Arrow, SQLite, PNG, CSV, Markdown — never a pickle.

    (The Trainer's epoch checkpoints hold ``torch.save`` archives while training runs; transformers
    reads them back only with ``weights_only=True``, and fine-tuning deletes them when it finishes.)
    """
    assert_no_pickles(session_home)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda rows: [{"text": r["text"]} for r in rows], "category"),
        (lambda rows: rows[:-1] + [{"text": "Where is my new card?", "category": "not_an_intent"}], "not_an_intent"),
    ],
    ids=["missing-column", "unknown-label"],
)
def test_bad_data_stops_before_training_and_leaves_registry(
    run_args: dict, tmp_path: Path, session_home: Path, mutate, expected: str
) -> None:
    domain = run_args["domain"]
    train_rows = json.loads(
        json.dumps(banking77_slice("train", ["card_arrival", "lost_or_stolen_card", "exchange_rate"], 10))
    )
    bad_train = write_csv(
        tmp_path / "train.csv",
        mutate(train_rows),
        columns=("text",) if expected == "category" else ("text", "category"),
    )
    test_file = write_csv(
        tmp_path / "test.csv", banking77_slice("test", ["card_arrival", "lost_or_stolen_card", "exchange_rate"], 5)
    )
    before = _registry_snapshot(session_home / "registry" / domain)

    result = CliRunner().invoke(
        app,
        ["run", domain, "--model", run_args["model"], "--train-file", str(bad_train), "--test-file", str(test_file)],
    )

    assert result.exit_code == 3, result.output  # bad data
    assert "data validation failed" in result.output
    assert expected in result.output and "train.csv" in result.output
    assert _registry_snapshot(session_home / "registry" / domain) == before
