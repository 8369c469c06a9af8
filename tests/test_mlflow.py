"""``domainflow registry export DOMAIN --mlflow URI``: the champion as a version of an MLflow registered model.

A real champion (the tiny domain's linear probe on a one-layer MiniLM, promoted into this module's own
registry) is exported to a SQLite MLflow store through the CLI; a fresh Python process then loads
``models:/domainflow-<domain>@champion`` with ``mlflow.pyfunc`` and must answer 20 real Banking77 texts
with the labels of ``domainflow predict`` (and its probabilities). What must hold besides: the run carries
the champion's lineage and test metrics, the same champion exported twice is one version, a new
champion is a new version and the alias follows a rollback without a duplicate, and a domain with no
champion, or of another kind, is refused before anything reaches MLflow.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from domainflow.catalog import get_domain, register
from domainflow.metrics import compute_metrics
from domainflow.modeling import load_classifier, predict_proba
from domainflow.records import DatasetRef
from domainflow.registry import ModelRegistry
from flows.cli import app
from tasks.finetune import make_train_config, train_linear_probe
from tests.data_helpers import banking77_rows, replace
from tests.process_helpers import clean_env

mlflow = pytest.importorskip("mlflow")

DOMAIN = "cs_mlflow"  # the tiny domain under its own name: its registry is this module's alone
EMPTY = "cs_mlflow_empty"  # never trained
MODEL = f"domainflow-{DOMAIN}"

LOAD_IN_A_FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
texts = json.loads(sys.argv[2])
answers = model.predict(texts)
framed = model.predict(pd.DataFrame({"text": texts}))
print(json.dumps({"labels": answers["label"].tolist(), "scores": answers["score"].tolist(),
                  "framed": framed["label"].tolist(), "columns": list(answers.columns)}))
"""


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def said(result: Result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """20 real Banking77 test texts of every intent (most are not among the six the model knows)."""
    return [row["text"].strip() for row in banking77_rows("test")[::150]][:20]


@pytest.fixture(scope="module")
def champion(tiny_domain: str, tiny_model_dir: Path, tiny_dataset: DatasetRef, tmp_path_factory) -> ModelRegistry:
    """A real classifier promoted as v1 of its own domain, with test metrics and lineage as deploy records them."""
    from datasets import load_from_disk

    spec = get_domain(tiny_domain)
    register(replace(spec, name=DOMAIN, description="Banking77, six intents (MLflow export tests)"))
    register(replace(spec, name=EMPTY, description="never trained"))
    config = make_train_config(get_domain(DOMAIN), str(tiny_model_dir), seed=7, num_layers=1)
    probe = train_linear_probe(tiny_dataset, config, tmp_path_factory.mktemp("probe") / "linear_probe")
    test = load_from_disk(tiny_dataset.path)["test"]
    predicted = predict_proba(load_classifier(probe.path), list(test["text"])).argmax(dim=1).numpy()
    metrics = compute_metrics(["accuracy", "macro_f1"], predicted, test["label"])
    registry = ModelRegistry(DOMAIN)
    registry.promote(
        Path(probe.path),
        metrics={"test": metrics, "validation": {"accuracy": 0.9}, "speed": {"texts_per_second_batch32": 123.0}},
        lineage={
            "domain": DOMAIN,
            "candidate": probe.name,
            "parent": None,
            "compression": None,
            "dataset_fingerprint": tiny_dataset.fingerprint,
            "run_config": {"model": str(tiny_model_dir), "train_config": config.model_dump()},
            "labels": list(tiny_dataset.label_names),
        },
        decision={"summary": "linear_probe promoted (tests)"},
    )
    return registry


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def export(store: str, *extra: str) -> dict[str, Any]:
    result = invoke("registry", "export", DOMAIN, "--mlflow", store, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def client(store: str) -> Any:
    return mlflow.MlflowClient(tracking_uri=store, registry_uri=store)


def test_the_exported_champion_answers_like_domainflow_predict(
    champion: ModelRegistry, store: str, texts: list[str], tmp_path: Path
) -> None:
    exported = export(store)
    assert exported["created"] is True and exported["model_version"] == "1" and exported["domainflow_version"] == 1
    assert exported["model_uri"] == f"models:/{MODEL}@champion"

    ours = invoke("predict", DOMAIN, *texts, "--top-k", "1")
    assert ours.exit_code == 0, ours.output
    predictions = json.loads(ours.stdout)["predictions"]
    loaded = load_classifier(champion.champion().model_dir)
    probabilities = predict_proba(loaded, texts).max(dim=1).values.tolist()

    env = clean_env(tmp_path, MLFLOW_TRACKING_URI=store, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    finished = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, exported["model_uri"], json.dumps(texts)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,  # nothing of the store is found through the working folder
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    answered = json.loads(finished.stdout.strip().splitlines()[-1])
    assert answered["columns"] == ["label", "score"]
    assert answered["labels"] == [p["label"] for p in predictions] == answered["framed"]
    assert len(set(answered["labels"])) >= 3  # real, varied answers
    assert answered["scores"] == pytest.approx(probabilities, abs=1e-5)
    assert not (tmp_path / "mlruns").exists()


def test_the_run_holds_the_champions_lineage_and_test_metrics(champion: ModelRegistry, store: str) -> None:
    version = export(store)  # already exported by the test above when run in order: the same version
    mlflow_client = client(store)
    model_version = mlflow_client.get_model_version(MODEL, version["model_version"])
    run = mlflow_client.get_run(model_version.run_id)
    info = champion.champion()
    assert run.data.metrics["test_accuracy"] == pytest.approx(info.metrics["test"]["accuracy"])
    assert run.data.metrics["test_macro_f1"] == pytest.approx(info.metrics["test"]["macro_f1"])
    assert run.data.metrics["speed_texts_per_second_batch32"] == 123.0
    params = run.data.params
    assert params["candidate"] == "linear_probe" and params["domain"] == DOMAIN
    assert params["run_config.train_config.encoder_lr"] == str(info.lineage["run_config"]["train_config"]["encoder_lr"])
    assert json.loads(params["labels"]) == info.lineage["labels"]
    assert model_version.tags["domainflow.version"] == "1" and model_version.tags["domainflow.domain"] == DOMAIN
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    assert experiment.name == DOMAIN  # the experiment training reports to
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "domainflow")}
    assert {"domainflow/lineage.json", "domainflow/metrics.json", "domainflow/decision.json"} <= artifacts
    root = Path(store.removeprefix("sqlite:///")).parent / "mlartifacts" / DOMAIN
    assert experiment.artifact_location == root.as_uri()  # beside the database, not ./mlruns


def test_the_same_champion_is_one_version_and_the_alias_follows_rollbacks(
    champion: ModelRegistry, store: str, tmp_path: Path
) -> None:
    first = export(store)
    again = export(store)
    assert again["created"] is False and again["model_version"] == first["model_version"]
    assert len(client(store).search_model_versions(f"name = '{MODEL}'")) == 1

    copy = shutil.copytree(champion.champion().model_dir, tmp_path / "model")  # v2: the same bytes, a new version
    champion.promote(copy, metrics={"test": {"accuracy": 0.5}}, lineage={"candidate": "hand-made"}, decision={})
    second = export(store)
    assert second["created"] is True and second["domainflow_version"] == 2
    assert str(client(store).get_model_version_by_alias(MODEL, "champion").version) == second["model_version"]

    champion.rollback(reason="tests")  # v1 is the champion again: its version exists, only the alias moves
    back = export(store)
    assert back["created"] is False and back["model_version"] == first["model_version"]
    assert str(client(store).get_model_version_by_alias(MODEL, "champion").version) == first["model_version"]
    assert len(client(store).search_model_versions(f"name = '{MODEL}'")) == 2

    named = export(store, "--name", "support-intents")
    assert named["created"] is True and named["name"] == "support-intents" and named["model_version"] == "1"


def test_no_champion_or_another_kind_is_refused_before_mlflow(champion: ModelRegistry, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'never.db'}"
    empty = invoke("registry", "export", EMPTY, "--mlflow", store)
    assert empty.exit_code == 2 and f"no champion for {EMPTY}" in said(empty), empty.output
    ranking = invoke("registry", "export", "recommendation", "--mlflow", store)
    assert ranking.exit_code == 2 and "recommendation is a ranking domain" in said(ranking), ranking.output
    unknown = invoke("registry", "export", "no_such_domain", "--mlflow", store)
    assert unknown.exit_code == 2 and "no_such_domain" in said(unknown)
    assert not (tmp_path / "never.db").exists()  # nothing was sent
    with socket.socket() as probe:  # a port nothing listens on: MLflow's client would retry it for minutes
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    unreachable = invoke("registry", "export", DOMAIN, "--mlflow", closed)
    assert unreachable.exit_code == 1 and f"cannot reach the MLflow server at {closed}" in said(unreachable)
