"""The ``domainflow`` command line, driven in-process through typer's CliRunner on ``flows.cli.app``.

One small classification run through ``run --json`` (one encoder layer, one epoch, a slice of the
tiny Banking77 domain, one compression recipe) makes the champion that ``predict`` and the
``registry`` commands then work on, so training happens once for the whole module. Everything else
(``domains``, the error exits) needs no model at all.

What must hold: exit codes (0 ok, 2 usage / unknown domain / nothing to do, 4 nothing promoted),
the JSON that tools read, answers that are the champion's own predictions with the domain's
replies, and a rollback that moves the champion and is recorded in the history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from domainflow.catalog import get_domain, register
from domainflow.modeling import load_classifier, predict_proba
from domainflow.registry import ModelRegistry
from flows.cli import app
from tests.conftest import TINY_LABELS
from tests.data_helpers import banking77_slice, replace

CLI_DOMAIN = "cs_cli"  # the tiny domain under its own name: its registry is this module's alone
EMPTY_DOMAIN = "cs_cli_empty"  # never trained: no champion, no history
MAX_TRAIN_SAMPLES = 90  # 15 per intent, split into train and validation
MAX_TEST_SAMPLES = 36  # 6 per intent (the domain needs at least 20 test rows)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def said(result: Result) -> str:
    """Everything a command printed (stdout and stderr), with rich's line wrapping undone."""
    return " ".join(result.output.split())


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli_domain(tiny_domain: str) -> str:
    """The tiny domain with one compression recipe (fewer candidates to build and time), and an untrained twin."""
    spec = get_domain(tiny_domain)
    register(
        replace(
            spec,
            name=CLI_DOMAIN,
            description="Banking77, six intents (CLI tests)",
            compression=replace(spec.compression, methods=("onnx_int8",)),
        )
    )
    register(replace(spec, name=EMPTY_DOMAIN, description="Banking77, six intents (never trained)"))
    return CLI_DOMAIN


@pytest.fixture(scope="module")
def cli_run(cli_domain: str, tiny_model_dir: Path, tiny_data_dir: Path) -> dict[str, Any]:
    """``domainflow run cs_cli --json --require-promotion`` on a slice, with a one-layer encoder: the summary."""
    result = invoke(
        "run",
        cli_domain,
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(tiny_data_dir),
        "--num-layers",
        "1",
        "--epochs",
        "1",
        "--max-train-samples",
        str(MAX_TRAIN_SAMPLES),
        "--max-test-samples",
        str(MAX_TEST_SAMPLES),
        "--seed",
        "11",
        "--json",
        "--require-promotion",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "with --json, stdout carries the summary alone:\n" + result.stdout[-3000:]
    return json.loads(lines[0])


# ------------------------------------------------------------------------------------------- run


def test_run_prints_its_summary_as_json_and_promotes(cli_run: dict[str, Any], cli_domain: str) -> None:
    summary = cli_run
    assert summary["domain"] == cli_domain and summary["version"] == 1 and summary["seconds"] > 0
    assert summary["dataset"]["num_rows"]["train"] + summary["dataset"]["num_rows"]["validation"] == MAX_TRAIN_SAMPLES
    assert summary["dataset"]["num_rows"]["test"] == MAX_TEST_SAMPLES
    decision = summary["decision"]
    assert decision["promote"] is True and decision["version"] == 1, decision["summary"]
    rows = {row["candidate"]: row for row in summary["candidates"]}
    reference = next(row["parent"] for row in rows.values() if row["compression"])
    assert set(rows) == {"linear_probe", "finetuned", f"{reference}-onnx-int8"}  # one int8 child of the reference
    assert [name for name, row in rows.items() if row["chosen"]] == [decision["chosen"]]
    for name, row in rows.items():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["reasons"], name
        assert row["texts_per_second_batch32"] > 0 and row["size_mb"] > 0, name
    assert rows[decision["chosen"]]["test_accuracy"] >= 0.5  # the domain's floor

    champion = ModelRegistry(cli_domain).champion()
    assert champion is not None and champion.version == 1
    assert Path(summary["champion_dir"]) == champion.model_dir
    assert champion.lineage["candidate"] == decision["chosen"]
    assert champion.lineage["run_config"]["train_config"]["num_layers"] == 1


def test_run_with_one_data_file_or_an_unknown_domain_is_a_usage_error(cli_domain: str, tiny_data_dir: Path) -> None:
    half = invoke("run", cli_domain, "--train-file", str(tiny_data_dir / "train.csv"))
    assert half.exit_code == 2, half.output
    assert "give both --train-file and --test-file" in said(half)
    unknown = invoke("run", "no_such_domain")
    assert unknown.exit_code == 2 and "unknown domain 'no_such_domain'" in said(unknown), unknown.output


# --------------------------------------------------------------------------------------- predict


def test_predict_answers_with_the_champions_own_predictions_and_the_domains_replies(
    cli_run: dict[str, Any], cli_domain: str
) -> None:
    spec = get_domain(cli_domain)
    answers = spec.answers
    texts = [row["text"] for row in banking77_slice("test", TINY_LABELS, 1)] + [
        "Can you recommend a good pizza place?",  # nothing to do with banking: unsure, so escalated
        "hello",
    ]
    result = invoke("predict", cli_domain, *texts, "--top-k", "2")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["domain"] == cli_domain and body["version"] == 1 and len(body["predictions"]) == len(texts)

    champion = ModelRegistry(cli_domain).champion()
    loaded = load_classifier(champion.model_dir)
    probabilities = predict_proba(loaded, texts, batch_size=len(texts))
    actions = set()
    for text, prediction, row in zip(texts, body["predictions"], probabilities, strict=True):
        scores, indices = row.topk(2)
        assert prediction["text"] == text
        assert [p["label"] for p in prediction["top_k"]] == [loaded.label_names[i] for i in indices.tolist()], text
        assert [p["score"] for p in prediction["top_k"]] == pytest.approx(scores.tolist(), abs=1e-3), text
        assert (prediction["label"], prediction["score"]) == (
            prediction["top_k"][0]["label"],
            prediction["top_k"][0]["score"],
        )
        if prediction["score"] >= answers.confidence_threshold:
            assert prediction["action"] == "reply" and prediction["reply"] == answers.replies[prediction["label"]]
        elif prediction["action"] == "reply_from_similar_question":  # close to a known question: its reply
            nearest = prediction["nearest_question"]
            assert nearest["close_enough"] is True and prediction["reply"] == answers.replies[nearest["label"]]
        else:
            assert prediction["action"] == "escalate" and prediction["reply"] == answers.escalation_reply
        if prediction["score"] < spec.retrieval.consult_below:  # unsure: the nearest known question goes along
            assert prediction["nearest_question"]["question"], prediction
        actions.add(prediction["action"])
    assert "reply" in actions and actions & {"escalate", "reply_from_similar_question"}, body


def test_predict_without_a_champion_or_on_a_ranking_domain_says_what_to_do(cli_domain: str) -> None:
    none_yet = invoke("predict", EMPTY_DOMAIN, "where is my card?")
    assert none_yet.exit_code == 2, none_yet.output
    assert f"no champion for {EMPTY_DOMAIN}: run `domainflow run {EMPTY_DOMAIN}` first" in said(none_yet)
    ranking = invoke("predict", "recommendation", "a film")
    assert ranking.exit_code == 2 and "recommendation is a ranking domain: use `domainflow recommend" in said(ranking)


def test_without_a_champion_after_a_run_that_promoted_nothing_says_why(cli_domain: str) -> None:
    """ "Run it first" would be wrong advice after a run whose gate refused its challenger: the message quotes
    the last decision instead."""
    from domainflow.registry import ModelRegistry

    rejected = "cs_cli_rejected"
    register(replace(get_domain(cli_domain), name=rejected, description="never promoted"))
    summary = "Nothing promoted for cs_cli_rejected: challenger x ties baseline next_item."
    ModelRegistry(rejected).record_decision({"promote": False, "chosen": "x", "summary": summary})
    answer = invoke("predict", rejected, "where is my card?")
    assert answer.exit_code == 2, answer.output
    assert f"no champion for {rejected}: its last run promoted nothing" in said(answer)
    assert summary in said(answer)


# -------------------------------------------------------------------------------------- registry


def test_registry_list_show_rollback_and_history(cli_run: dict[str, Any], cli_domain: str, tmp_path: Path) -> None:
    registry = ModelRegistry(cli_domain)
    chosen = cli_run["decision"]["chosen"]
    chosen_row = next(row for row in cli_run["candidates"] if row["chosen"])

    (listed,) = json_lines(invoke("registry", "list", cli_domain, "--json").stdout)
    assert (listed["version"], listed["champion"], listed["candidate"]) == (1, True, chosen)
    assert listed["metrics"]["test"]["accuracy"] == pytest.approx(chosen_row["test_accuracy"])
    table = invoke("registry", "list", cli_domain)
    assert table.exit_code == 0 and f"{cli_domain} registry" in table.stdout and chosen in table.stdout

    shown = invoke("registry", "show", cli_domain)
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert record["version"] == 1 and record["lineage"]["candidate"] == chosen
    assert record["lineage"]["labels"] == list(get_domain(cli_domain).label_names)
    assert record["metrics"]["test"]["accuracy"] == pytest.approx(chosen_row["test_accuracy"])

    # One version only: nothing to roll back to, said plainly, and nothing changes.
    history_before = registry.history_file.read_bytes()
    alone = invoke("registry", "rollback", cli_domain)
    assert alone.exit_code == 2, alone.output
    assert f"{cli_domain}: no earlier champion to roll back to from v1" in said(alone)
    assert registry.champion().version == 1 and registry.history_file.read_bytes() == history_before

    # A second version (the same model under another candidate name), then an undo back to v1.
    copy = shutil.copytree(registry.champion().model_dir, tmp_path / "model")
    registry.promote(
        copy, metrics={"test": {"accuracy": 0.5}}, lineage={"candidate": "hand-made"}, decision={"summary": "v2"}
    )
    assert json.loads(invoke("predict", cli_domain, "where is my card?").stdout)["version"] == 2
    undone = invoke("registry", "rollback", cli_domain, "--reason", "v2 misroutes cards")
    assert undone.exit_code == 0, undone.output
    assert f"{cli_domain}: champion is now version 1" in said(undone)
    assert registry.champion().version == 1
    assert json.loads(invoke("predict", cli_domain, "where is my card?").stdout)["version"] == 1
    assert [
        (v["version"], v["champion"]) for v in json_lines(invoke("registry", "list", cli_domain, "--json").stdout)
    ] == [
        (1, True),
        (2, False),
    ]

    history = invoke("registry", "history", cli_domain, "--json")
    assert history.exit_code == 0, history.output
    events = json_lines(history.stdout)
    assert [e["event"] for e in events] == ["decision", "promotion", "promotion", "rollback"]
    assert [e.get("version") for e in events if e["event"] == "promotion"] == [1, 2]
    last = events[-1]
    assert (last["from"], last["to"], last["mode"], last["reason"]) == (2, 1, "undo", "v2 misroutes cards")

    # Back at the first champion, an undo has nowhere to go; a pinned version still does.
    again = invoke("registry", "rollback", cli_domain)
    assert again.exit_code == 2 and "no earlier champion to roll back to from v1" in said(again), again.output
    pinned = invoke("registry", "rollback", cli_domain, "--to", "2", "--reason", "fixed after all")
    assert pinned.exit_code == 0 and "champion is now version 2" in said(pinned), pinned.output
    assert registry.champion().version == 2
    assert json_lines(invoke("registry", "history", cli_domain, "--json").stdout)[-1] | {"at": None} == {
        "event": "rollback",
        "at": None,
        "from": 1,
        "to": 2,
        "mode": "pin",
        "reason": "fixed after all",
    }
    text_history = invoke("registry", "history", cli_domain)
    assert text_history.exit_code == 0 and '"fixed after all"' in text_history.stdout

    v2 = json.loads(invoke("registry", "show", cli_domain, "--version", "2").stdout)
    assert (v2["version"], v2["lineage"]["candidate"]) == (2, "hand-made")
    missing = invoke("registry", "show", cli_domain, "--version", "9")
    assert missing.exit_code == 2, missing.output
    assert f"{cli_domain}: no version 9 at" in said(missing) and "(known versions: 1, 2)" in said(missing)


def test_registry_commands_on_a_domain_without_versions(cli_domain: str) -> None:
    rollback = invoke("registry", "rollback", EMPTY_DOMAIN)
    assert rollback.exit_code == 2, rollback.output
    assert f"{EMPTY_DOMAIN}: nothing to roll back: no champion" in said(rollback)
    show = invoke("registry", "show", EMPTY_DOMAIN)
    assert show.exit_code == 2 and f"no champion for {EMPTY_DOMAIN}" in said(show), show.output
    listed = invoke("registry", "list", EMPTY_DOMAIN, "--json")
    assert listed.exit_code == 0 and listed.stdout.strip() == ""
    assert f"no versions registered for {EMPTY_DOMAIN}" in said(invoke("registry", "list", EMPTY_DOMAIN))
    history = invoke("registry", "history", EMPTY_DOMAIN, "--json")
    assert history.exit_code == 0 and history.stdout.strip() == ""


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "no_such_domain", "hello"],
        ["registry", "list", "no_such_domain"],
        ["registry", "show", "no_such_domain"],
        ["registry", "history", "no_such_domain"],
        ["registry", "rollback", "no_such_domain"],
        ["domains", "show", "no_such_domain"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_an_unknown_domain_exits_2_and_lists_the_known_ones(command: list[str]) -> None:
    result = invoke(*command)
    assert result.exit_code == 2, result.output
    message = said(result)
    assert "unknown domain 'no_such_domain'; known domains:" in message and "customer_service" in message
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------- domains


def test_domains_lists_every_domain_as_text_and_json(tiny_domain: str) -> None:
    listed = invoke("domains", "--json")
    assert listed.exit_code == 0, listed.output
    by_name = {entry["name"]: entry for entry in json_lines(listed.stdout)}
    assert {"customer_service", "finance_sentiment", "recommendation", tiny_domain} <= set(by_name)
    service = by_name["customer_service"]
    assert (service["task_kind"], service["primary_metric"], service["origin"]) == (
        "text_classification",
        "accuracy",
        "entry point builtin",
    )
    assert service["labels"] == list(get_domain("customer_service").label_names) and len(service["labels"]) == 77
    assert by_name["recommendation"]["task_kind"] == "ranking" and by_name["recommendation"]["labels"] is None

    text = invoke("domains")
    assert text.exit_code == 0, text.output
    shown = said(text)
    for name in by_name:
        assert f"{name}:" in shown
    assert f"customer_service: {get_domain('customer_service').description} (77 labels;" in shown


def test_domains_show_gives_every_field_with_defaults(tiny_domain: str) -> None:
    shown = invoke("domains", "show", "customer_service")
    assert shown.exit_code == 0, shown.output
    fields = json.loads(shown.stdout)
    assert fields == get_domain("customer_service").model_dump(mode="json", by_alias=True)
    assert fields["name"] == "customer_service" and fields["gates"]["min_metrics"] == {"accuracy": 0.9, "macro_f1": 0.9}
    assert fields["retrieval"]["consult_below"] == 0.5 and len(fields["labels"]) == 77
    tiny = json.loads(invoke("domains", "show", tiny_domain).stdout)
    assert tiny["gates"]["min_metrics"] == {"accuracy": 0.5} and tiny["compression"]["student_layers"] == 1


def test_domains_fields_lists_the_keys_of_each_task_kind() -> None:
    classification = invoke("domains", "fields")
    assert classification.exit_code == 0, classification.output
    for key in ("training.epochs", "gates.min_metrics", "compression.methods", "answers.confidence_threshold"):
        assert key in classification.stdout, key
    ranking = invoke("domains", "fields", "--kind", "ranking")
    assert ranking.exit_code == 0 and "domain file keys (ranking)" in said(ranking), ranking.output
    unknown = invoke("domains", "fields", "--kind", "summaries")
    assert unknown.exit_code == 2 and "summaries" in said(unknown), unknown.output
