"""The whole flow end to end on real Banking77 rows with the real MiniLM cut to two layers.

One sequence of runs in one registry, so each run sees what the earlier one left:
a crash mid-way, a resumed run that deploys, an identical rerun served from the
cache, and two bad data files that must stop before training and change nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tasks.evaluate
import tasks.finetune
import tasks.ingest
from domainflow.modeling import load_classifier, predict_proba
from domainflow.registry import ModelRegistry
from flows.cli import app
from flows.pipeline import domain_pipeline
from tests.data_helpers import banking77_slice, write_csv
from tests.file_checks import assert_no_pickles
from tests.process_helpers import task_states


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
        "measure-speed",
    ):
        assert set(states.get(step, ["Cached"])) == {"Cached"}, states
    assert states.get("deploy") == ["Completed"]


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
