"""Training reports to TensorBoard and MLflow (``[training] report_to``, ``domainflow run --report-to``).

Real fine-tuning of the tiny domain (a one-layer MiniLM from its linear probe, one epoch) through the same
``train_classifier`` the pipeline, recovery training and distillation use, built in a private folder by
``domainflow.atomic`` as the pipeline does: the TensorBoard events are read back with TensorBoard's own
reader and the MLflow run from its SQLite store. What must hold besides: reporting is not part of a model's
cache key or folder (it changes no weight), it survives the hand-over to DDP ranks, a missing library
fails before training naming the extra to install, and the CLI refuses what it cannot honour before
anything runs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
from prefect.cache_policies import INPUTS
from typer.testing import CliRunner

from domainflow import settings
from domainflow.atomic import build_atomically
from domainflow.catalog import get_domain
from domainflow.domain_files import load_domain_file
from domainflow.records import DatasetRef, ModelRef
from domainflow.tracking import (
    ReportingUnavailableError,
    default_tracking_uri,
    mlflow_tracking_uri,
    parse_report_to,
    published_name,
)
from flows.cli import app
from tasks.finetune import (
    FINETUNED,
    TrainConfig,
    finetune,
    finetune_classifier,
    locals_of_call,
    make_train_config,
    model_dir,
    train_linear_probe,
)

FOLDER = "finetuned-reporting"  # the candidate folder the training is published as


def _config(tiny_domain: str, tiny_model_dir: Path, report_to: list[str] | None) -> TrainConfig:
    return make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=7, report_to=report_to)


@pytest.fixture(scope="module")
def probe(tiny_dataset: DatasetRef, tiny_domain: str, tiny_model_dir: Path, tmp_path_factory) -> ModelRef:
    config = make_train_config(get_domain(tiny_domain), str(tiny_model_dir), seed=7, num_layers=1)
    return train_linear_probe(tiny_dataset, config, tmp_path_factory.mktemp("probe") / "probe")


@pytest.fixture(scope="module")
def reported(
    tiny_dataset: DatasetRef, probe: ModelRef, tiny_domain: str, tiny_model_dir: Path, tmp_path_factory
) -> dict[str, Any]:
    """One fine-tune reporting to both TensorBoard and MLflow's default store (the home's SQLite database)."""
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    config = _config(tiny_domain, tiny_model_dir, ["tensorboard", "mlflow"])
    target = tmp_path_factory.mktemp("models") / FOLDER
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            model = build_atomically(
                target, lambda out: finetune_classifier(tiny_dataset, Path(probe.path), config, out)
            )
        finally:
            mlflow.set_tracking_uri(None)  # training pointed the process at the home's store: unset it
    return {"model": model, "config": config}


def test_tensorboard_events_hold_the_training_loss(reported: dict[str, Any], tiny_dataset: DatasetRef) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = settings.runs_dir() / tiny_dataset.domain / "tensorboard" / FOLDER  # the published name, not .partial
    assert folder.is_dir(), sorted(p.name for p in folder.parent.iterdir())
    (events,) = folder.glob("events.out.tfevents.*")  # one writer: one event file
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/accuracy", "eval/loss", "train/train_loss"} <= scalars, scalars
    losses = accumulator.Scalars("train/loss")
    # 9 steps of 16 texts: a point every 2 steps (4 an epoch), not one at the end (logging_steps was 50)
    assert len(losses) >= 3 and [e.step for e in losses] == sorted({e.step for e in losses})
    assert all(math.isfinite(e.value) and 0.0 < e.value < 5.0 for e in losses)
    (accuracy,) = accumulator.Scalars("eval/accuracy")  # one epoch, one evaluation
    assert 0.5 <= accuracy.value <= 1.0  # six intents: chance is 1/6


def test_mlflow_run_in_the_home_store_has_the_curves_and_the_recipe(
    reported: dict[str, Any], tiny_dataset: DatasetRef
) -> None:
    import mlflow

    uri = default_tracking_uri()
    assert (settings.home() / "mlflow" / "mlflow.db").is_file()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(tiny_dataset.domain)  # one experiment per domain
    assert experiment is not None
    assert experiment.artifact_location == (settings.home() / "mlflow" / "mlartifacts" / tiny_dataset.domain).as_uri()
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{FOLDER}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["domainflow.domain"] == tiny_dataset.domain
    config: TrainConfig = reported["config"]
    params = run.data.params
    assert params["domainflow.encoder_lr"] == str(config.encoder_lr)  # domainflow's recipe, under its prefix
    assert params["domainflow.candidate"] == FINETUNED and params["domainflow.parent"] == "linear_probe"
    assert params["domainflow.dataset_fingerprint"] == tiny_dataset.fingerprint
    assert "learning_rate" in params and "num_train_epochs" in params  # the Trainer's callback, in the same run
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 3 and all(math.isfinite(m.value) and m.value > 0 for m in losses)
    assert 0.5 <= run.data.metrics["eval_accuracy"] <= 1.0 and run.data.metrics["train_loss"] > 0


def test_under_ddp_rank_0_alone_reports(
    tiny_dataset: DatasetRef, probe: ModelRef, tiny_domain: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Two torchrun ranks train; one event file and one MLflow run come out (MLFLOW_TRACKING_URI reaches them)."""
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"sqlite:///{tmp_path / 'ddp.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    config = _config(tiny_domain, tiny_model_dir, ["tensorboard", "mlflow"]).model_copy(update={"processes": 2})
    folder = "finetuned-ddp-reporting"
    build_atomically(tmp_path / folder, lambda out: finetune_classifier(tiny_dataset, Path(probe.path), config, out))

    (events,) = (settings.runs_dir() / tiny_dataset.domain / "tensorboard" / folder).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert len(accumulator.Scalars("train/loss")) >= 3
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name(tiny_dataset.domain)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == folder and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 3


def test_reporting_changes_neither_the_cache_key_nor_the_model_folder(
    tiny_dataset: DatasetRef, tiny_domain: str, tiny_model_dir: Path
) -> None:
    """Decided in tasks/finetune.py (TrainConfig.report_to): reporting changes no weight, so it must not retrain."""
    quiet = _config(tiny_domain, tiny_model_dir, [])
    loud = quiet.model_copy(update={"report_to": ("tensorboard",)})
    assert INPUTS.compute_key(None, {"config": quiet}, {}) == INPUTS.compute_key(None, {"config": loud}, {})
    assert model_dir(tiny_dataset, FINETUNED, finetune, "init", quiet) == model_dir(
        tiny_dataset, FINETUNED, finetune, "init", loud
    )
    assert "report_to" not in loud.model_dump()  # nor in the lineage (run_config.train_config)
    # … but a knob that does shape the model still changes both
    other = quiet.model_copy(update={"encoder_lr": quiet.encoder_lr * 2})
    assert INPUTS.compute_key(None, {"config": quiet}, {}) != INPUTS.compute_key(None, {"config": other}, {})


def test_report_to_reaches_the_ddp_ranks(tiny_dataset: DatasetRef, tmp_path: Path) -> None:
    """The call a torchrun rank reads back keeps report_to (model_dump alone would drop it)."""
    config = TrainConfig(base_model="m", base_fingerprint="f", report_to=("mlflow",))
    call = {name: None for name in ("compression", "epochs", "teacher_dir", "extra_metadata", "checkpoints", "adapter")}
    call |= {"dataset": tiny_dataset, "init_dir": tmp_path, "config": config, "out_dir": tmp_path / "o"}
    call |= {"name": FINETUNED, "parent": None, "distill_temperature": 2.0, "distill_alpha": 0.5}
    assert TrainConfig.model_validate(locals_of_call(call)["config"]).report_to == ("mlflow",)


def test_a_missing_library_fails_before_training_naming_the_extra(
    tiny_dataset: DatasetRef, probe: ModelRef, tiny_domain: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ReportingUnavailableError, match=r"pip install -e '\.\[tensorboard\]'"):
        _config(tiny_domain, tiny_model_dir, ["tensorboard"])
    config = _config(tiny_domain, tiny_model_dir, []).model_copy(update={"report_to": ("tensorboard",)})
    with pytest.raises(ReportingUnavailableError, match="tensorboard"):  # on a worker that lacks it: before any work
        finetune_classifier(tiny_dataset, Path(probe.path), config, tmp_path / "never")
    assert not any(tmp_path.iterdir())


def test_the_domain_file_sets_report_to_and_the_option_replaces_it(
    tiny_domain: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    domain_file = tmp_path / "reporting.toml"
    domain_file.write_text(
        'name = "reporting"\nlabels = ["a", "b"]\n[source]\ntrain = "t.csv"\ntest = "s.csv"\n'
        '[training]\nreport_to = "mlflow"\n'
    )
    spec = load_domain_file(domain_file)
    assert spec.training.report_to == ("mlflow",)  # a single name is a list of one
    if _has("mlflow"):
        assert make_train_config(spec, str(tiny_model_dir)).report_to == ("mlflow",)
        assert make_train_config(spec, str(tiny_model_dir), report_to=[]).report_to == ()  # --report-to none
    bad = domain_file.read_text().replace('"mlflow"', '["wandb"]')
    domain_file.write_text(bad)
    with pytest.raises(Exception, match=r"training\.report_to\.0"):
        load_domain_file(domain_file)


def test_report_to_option_values() -> None:
    assert parse_report_to(["tensorboard,mlflow", "tensorboard"]) == ("tensorboard", "mlflow")
    assert parse_report_to(["MLflow"]) == ("mlflow",)
    assert parse_report_to(["none"]) == ()
    with pytest.raises(ReportingUnavailableError, match="unknown report_to 'wandb'"):
        parse_report_to(["mlflow,wandb"])


def test_names_and_uris(monkeypatch, tmp_path: Path) -> None:
    target = tmp_path / "distilled-l3-abc123"
    seen: list[str] = []
    build_atomically(target, lambda out: seen.append(published_name(out)))  # the name inside the private folder
    assert seen == ["distilled-l3-abc123"] and published_name(target) == "distilled-l3-abc123"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri() == f"sqlite:///{settings.home() / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_tracking_uri() == "http://mlflow.example:5000"


def test_the_cli_refuses_what_it_cannot_report_before_running(tiny_domain: str) -> None:
    unknown = CliRunner().invoke(app, ["run", tiny_domain, "--report-to", "tensorboard,wandb"])
    assert unknown.exit_code == 2 and "unknown report_to 'wandb'" in " ".join(unknown.output.split())
    ranking = CliRunner().invoke(app, ["run", "recommendation", "--report-to", "none"])
    said = " ".join(ranking.output.split())
    assert ranking.exit_code == 2 and "recommendation is a ranking domain" in said, said


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
