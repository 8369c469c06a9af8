"""A user's own domain, as a file: read and validated, run end to end, known by name everywhere,
with cache keys that follow every spec field and every module a task imports.

The domain used here ships nowhere in the package: ``tests/domain_files/pet_clinic`` (five intents
of a veterinary clinic's front desk, 14 training and 6 test messages each, written for these tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from domainflow import settings
from domainflow.catalog import get_domain
from domainflow.domain_files import DomainFileError, load_domain_file
from domainflow.registry import ModelRegistry
from domainflow.spec import ClassificationSpec
from flows.cli import app
from flows.pipeline import domain_pipeline
from tests.data_helpers import PET_CLINIC, copy_domain
from tests.process_helpers import free_port, stop_group, task_states, wait_for

PET_LABELS = ["book_visit", "cancel_visit", "emergency", "medicine_refill", "opening_hours"]


# ------------------------------------------------------------------------------ reading files


def test_a_minimal_file_gets_every_default(tmp_path: Path) -> None:
    path = copy_domain(
        tmp_path,
        "minimal",
        'name = "minimal"\ntext_column = "message"\nlabel_column = "intent"\n'
        '[source]\ntrain = "train.csv"\ntest = "test.csv"\n',
    )
    spec = load_domain_file(path)
    assert isinstance(spec, ClassificationSpec) and spec.label_names is None
    assert (spec.primary_metric, spec.metrics, spec.training.epochs, spec.compression.sparsity) == (
        "accuracy",
        ("accuracy", "macro_f1"),
        3.0,
        0.5,
    )
    assert spec.source.resolve()["train"] == (path.parent / "train.csv").resolve()


def test_the_pet_clinic_file_reads_its_replies_csv_and_inline_replies() -> None:
    spec = load_domain_file(PET_CLINIC / "pet_clinic.toml")
    assert sorted(spec.answers.replies) == PET_LABELS  # four from replies.csv, emergency inline
    assert spec.respond("emergency", 0.9)["reply"].startswith("Please call our emergency line")
    assert spec.respond("book_visit", 0.1) == {
        "action": "escalate",
        "reply": "A member of our team will call you back shortly.",
    }


@pytest.mark.parametrize(
    "body, message",
    [
        ('name = "x"\nepochs = 3\n', "epochs: Extra inputs are not permitted"),
        ('name = "x"\n[training]\nepochs = "three"\n', "training.epochs: Input should be a valid number"),
        ('name = "x"\ntask_kind = "summaries"\n', "unknown task kind 'summaries'"),
        ('name = "x"\nprimary_metric = "f2"\n', "primary_metric 'f2' is not among metrics"),
        ('name = "x"\nlabels = ["a", "b", "a"]\n', "labels are listed twice: ['a']"),
        (
            'name = "x"\nlabels = ["a", "b"]\n[answers.replies]\nc = "hi"\n',
            "answers.replies names labels the domain does not have: ['c']",
        ),
        ('name = "x"\n[answers]\nreplies_file = "nope.csv"\n', "nope.csv does not exist"),
        ('name = "x"\nthis is not toml\n', "not valid TOML"),
    ],
)
def test_a_bad_file_is_an_error_naming_the_file_and_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(DomainFileError) as raised:
        load_domain_file(path)
    assert str(path) in str(raised.value) and message in str(raised.value)


def test_the_shipped_domains_are_files_found_through_the_entry_point() -> None:
    from domainflow.catalog import catalog

    entries = catalog()
    for name in ("customer_service", "finance_sentiment", "recommendation"):
        assert entries[name].origin == "entry point builtin"
    assert len(entries["customer_service"].spec.answers.replies) == 77


def test_the_core_imports_nothing_above_it() -> None:
    """domainflow/ never imports domains, tasks, flows or serving (the layering the design names)."""
    offenders = [
        f"{path}:{number}: {line.strip()}"
        for path in sorted(Path("domainflow").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip().startswith(
            (
                "from domains",
                "import domains",
                "from tasks",
                "import tasks",
                "from flows",
                "import flows",
                "from serving",
                "import serving",
            )
        )
    ]
    assert offenders == []


# ---------------------------------------------------------------------- cache keys follow the spec


def _run(path: Path, model: Path) -> tuple[dict, dict[str, list[str]]]:
    state = domain_pipeline(domain=str(path), model=str(model), num_layers=1, seed=3, return_state=True)
    return state.result(), task_states(state.state_details.flow_run_id)


CACHEABLE = ("ingest", "linear-probe", "finetune", "quantize", "prune-magnitude", "evaluate", "measure-speed")


def _missed(states: dict[str, list[str]]) -> set[str]:
    return {name for name in CACHEABLE for state in states.get(name, []) if state != "Cached"}


BASE = """name = "{name}"
text_column = "message"
label_column = "intent"
metrics = {metrics}
validation_fraction = {fraction}
{labels}
[source]
train = "train.csv"
test = "test.csv"
[gates]
min_metrics = {{ accuracy = 0.3 }}
[training]
epochs = 1.0
batch_size = 16
[compression]
methods = ["onnx_int8", "magnitude_prune"]
sparsity = {sparsity}
"""


def test_changing_a_spec_field_misses_exactly_the_steps_it_shapes(tmp_path: Path, tiny_model_dir: Path) -> None:
    fields = {
        "name": "pet_cache",
        "metrics": '["accuracy", "macro_f1"]',
        "fraction": 0.2,
        "labels": "",
        "sparsity": 0.3,
    }
    path = copy_domain(tmp_path, "pet_cache", BASE.format(**fields))

    first, _ = _run(path, tiny_model_dir)
    assert first["version"] == 1

    _, identical = _run(path, tiny_model_dir)
    assert _missed(identical) == set(), identical  # every step from the cache

    path.write_text(BASE.format(**{**fields, "sparsity": 0.4}))
    pruned, states = _run(path, tiny_model_dir)
    assert _missed(states) == {"prune-magnitude", "evaluate", "measure-speed"}, states
    assert "finetuned-sparse40" in {row["candidate"] for row in pruned["candidates"]}

    path.write_text(BASE.format(**{**fields, "metrics": '["accuracy", "macro_f1", "per_class_recall"]'}))
    measured, states = _run(path, tiny_model_dir)
    assert _missed(states) == {"evaluate", "measure-speed"}, states  # training and compression reused
    reports = sorted(
        (settings.runs_dir() / "pet_cache" / "reports").glob("finetuned-*/metrics.json"),
        key=lambda p: p.stat().st_mtime_ns,
    )
    assert "recall_0" in json.loads(reports[-1].read_text())["test"]  # the new metric was computed
    assert measured["version"] is None  # same models: a tie keeps champion v1

    path.write_text(BASE.format(**{**fields, "fraction": 0.3}))
    _, states = _run(path, tiny_model_dir)
    assert {"ingest", "linear-probe", "finetune"} <= _missed(states), states

    reordered = 'labels = ["opening_hours", "medicine_refill", "emergency", "cancel_visit", "book_visit"]'
    path.write_text(BASE.format(**{**fields, "labels": reordered}))
    _, states = _run(path, tiny_model_dir)
    assert {"ingest", "linear-probe", "finetune"} <= _missed(states), states


def test_a_module_a_task_imports_indirectly_is_in_its_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tasks.caching as caching

    closure = caching.module_closure("tasks.compress")
    # imported through tasks.finetune and domainflow.modeling, never named by tasks/compress.py itself
    assert {
        "tasks.finetune",
        "domainflow.spec",
        "domainflow.fingerprint",
        "domainflow.atomic",
        "domainflow.modeling",
    } <= set(closure)
    before = caching.code_fingerprint("tasks.compress")
    changed = tmp_path / "atomic.py"
    changed.write_text(closure["domainflow.atomic"].read_text() + "\n# a comment is a change\n")
    real = caching.module_file
    monkeypatch.setattr(caching, "module_file", lambda name: changed if name == "domainflow.atomic" else real(name))
    assert caching.code_fingerprint("tasks.compress") != before
    assert caching.code_fingerprint("tasks.report") == caching.code_fingerprint("tasks.report")  # stable


# ------------------------------------------------------------------ from the CLI, known by name


def test_a_new_domain_runs_from_the_cli_and_every_command_knows_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = copy_domain(
        tmp_path,
        "pet_clinic",
        (PET_CLINIC / "pet_clinic.toml").read_text().replace('name = "pet_clinic"', 'name = "pet_cli"'),
    )
    runner = CliRunner()
    ran = runner.invoke(
        app, ["run", str(path), "--model", str(tiny_model_dir), "--num-layers", "1", "--json", "--require-promotion"]
    )
    assert ran.exit_code == 0, ran.output
    summary = json.loads(ran.stdout.strip().splitlines()[-1])
    assert summary["version"] == 1 and summary["domain"] == "pet_cli"

    added = runner.invoke(app, ["domains", "add", str(path)])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["domains", "--json"])
    origins = {json.loads(line)["name"]: json.loads(line)["origin"] for line in listed.stdout.splitlines()}
    assert origins["pet_cli"] == f"file {path}"

    predicted = runner.invoke(app, ["predict", "pet_cli", "my cat ate chocolate and is shaking, help tonight!"])
    assert predicted.exit_code == 0, predicted.output
    record = json.loads(predicted.stdout)["predictions"][0]
    assert record["label"] in PET_LABELS and record["action"] in {"reply", "reply_from_similar_question", "escalate"}

    served = _served_answer("pet_cli", "Please call off the visit we booked for my dog next Friday")  # a known question
    assert (
        served["label"] == "cancel_visit" and served["reply"] == get_domain("pet_cli").answers.replies["cancel_visit"]
    )

    versions = [
        json.loads(line) for line in runner.invoke(app, ["registry", "list", "pet_cli", "--json"]).stdout.splitlines()
    ]
    assert [(v["version"], v["champion"]) for v in versions] == [(1, True)]
    lineage = ModelRegistry("pet_cli").champion().lineage
    assert lineage["labels"] == PET_LABELS  # taken from the data, sorted, kept for the next runs

    again = runner.invoke(
        app, ["run", "pet_cli", "--model", str(tiny_model_dir), "--num-layers", "1", "--require-promotion"]
    )
    assert again.exit_code == 4, again.output  # ran, tied the champion, nothing promoted

    extra = tmp_path / "pet_clinic" / "train.csv"
    groomed = [
        f"Can my {pet} get a bath and a trim {day}?,grooming\n"
        for pet in ("dog", "cat")
        for day in ("on Monday", "on Friday", "tomorrow")
    ]
    extra.write_text(extra.read_text() + "".join(groomed))
    relabelled = runner.invoke(app, ["run", "pet_cli", "--model", str(tiny_model_dir), "--num-layers", "1"])
    assert relabelled.exit_code == 3, relabelled.output  # a new label is a clear data error
    assert "new: ['grooming']" in relabelled.output and ModelRegistry("pet_cli").champion().version == 1


def _served_answer(domain: str, text: str) -> dict:
    """``domainflow serve DOMAIN`` in its own process (real uvicorn on a free loopback port): its answer to ``text``."""
    import httpx

    port, key = free_port(), "pet-clinic-key-0123456789abcdef"
    env = {**os.environ, "DOMAINFLOW_API_KEYS": key}
    command = [sys.executable, "-m", "flows.cli", "serve", domain, "--port", str(port)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, f"serve exited with {process.returncode}"
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, "the service to load the champion", timeout=180)
        answer = httpx.post(
            f"{url}/v1/{domain}/predict", json={"texts": [text]}, headers={"X-API-Key": key}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"][0]
    finally:
        stop_group(process)


def test_two_identical_runs_at_once_end_cleanly_with_one_promotion(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Real processes, one home: the second waits for the first's lock, then ties its champion."""
    path = copy_domain(
        tmp_path,
        "pet_twice",
        (PET_CLINIC / "pet_clinic.toml").read_text().replace('name = "pet_clinic"', 'name = "pet_twice"'),
    )
    env = {**os.environ, "DOMAINFLOW_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_HOME", None), env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(path),
        "--model",
        str(tiny_model_dir),
        "--num-layers",
        "1",
        "--json",
    ]
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    versions = sorted(json.loads(out.strip().splitlines()[-1])["version"] or 0 for out, _ in outputs)
    assert versions == [0, 1]  # one promoted v1, the other kept it
    history = (tmp_path / "home" / "registry" / "pet_twice" / "versions").iterdir()
    assert [p.name for p in history] == ["0001"]


def test_get_domain_resolves_names_and_files() -> None:
    by_file = get_domain(str(PET_CLINIC / "pet_clinic.toml"))
    assert by_file.name == "pet_clinic"
    with pytest.raises(KeyError, match="unknown domain 'no_such'"):
        get_domain("no_such")
