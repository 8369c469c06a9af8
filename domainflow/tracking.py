"""Experiment tracking for training: the Trainer's own TensorBoard and MLflow reporting, pointed at the home.

A domain's ``[training] report_to`` (or ``domainflow run --report-to``) reaches
``TrainingArguments(report_to=...)`` and the Trainer's integrations do the reporting; this module
only decides *where*, and fails early when a library is missing:

* TensorBoard: ``<DOMAINFLOW_HOME>/runs/<domain>/tensorboard/<candidate folder>``, the folder name of the
  candidate being trained (``finetuned-<key>``, ``distilled-l3-<key>``…), so a curve names the model it
  belongs to. A retrain of the same candidate (``--refresh-cache``, or a resume after a crash) adds an
  event file to the same folder.
* MLflow: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store under the home
  (``<home>/mlflow/mlflow.db``; MLflow 3 refuses new file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is
  set, and a SQLite store also holds a model registry). One experiment per domain, named after it; one
  run per trained candidate, named like its folder. The run is started here, not by the Trainer's
  callback, because the callback reads its experiment from a process-wide environment variable, and two
  domains training at once in one process (``domainflow run A B``) would race for it; MLflow's active
  run is per thread, so each training thread logs into its own run.

Under DDP every rank builds the same Trainer; the integrations report from rank 0 only, and the MLflow
run is started on rank 0 only.

Why reporting is *not* part of a model's cache key: it does not change one weight (the same seed and data
give the same model with or without it), so toggling it must not retrain or rename a candidate folder.
The price: a step served from the cache trains nothing and so reports nothing; to get the curves of a
candidate that is already cached, run with ``--refresh-cache``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

from domainflow import settings
from domainflow.atomic import SUFFIX
from domainflow.spec import Reporter

REPORTERS: tuple[str, ...] = get_args(Reporter)
#: reporter -> (the module it needs, the extra of pyproject.toml that installs it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


class ReportingUnavailableError(ValueError):
    """A reporter was asked for whose library is not installed, or that does not exist.

    A ``ValueError`` so that ``domainflow run`` exits 2 with the message (a setting to fix, not a bug).
    """


def parse_report_to(values: Iterable[str]) -> tuple[str, ...]:
    """Reporters from CLI values: repeated options and comma lists both work; ``none`` alone means off."""
    names = [part.strip().lower() for value in values for part in value.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in REPORTERS]
    if unknown:
        raise ReportingUnavailableError(
            f"unknown report_to {', '.join(repr(n) for n in unknown)}: known {', '.join(REPORTERS)} (or none)"
        )
    return tuple(dict.fromkeys(names))


def require_reporters(report_to: Sequence[str]) -> None:
    """Fail before any training when a reporter's library is missing, naming the extra that installs it.

    Checked where the run starts and again where training runs (a worker may lack what the flow has).
    """
    for name in report_to:
        if name not in NEEDS:
            raise ReportingUnavailableError(f"unknown report_to {name!r}: known {', '.join(REPORTERS)}")
        module, extra = NEEDS[name]
        if not _installed(module):
            raise ReportingUnavailableError(
                f"report_to {name!r} needs the {module} package, which is not installed here: "
                f"pip install -e '.[{extra}]' (the domainflow extra {extra!r}), or drop {name} from report_to"
            )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (blocked)
        return False


def published_name(out_dir: Path) -> str:
    """The candidate folder's own name, also while it is built in its private folder (domainflow.atomic)."""
    name = Path(out_dir).name
    if name.startswith(".") and name.endswith(SUFFIX):  # .<name>.<pid>-<random>.partial
        return name[1 : -len(SUFFIX)].rsplit(".", 1)[0]
    return name


def tensorboard_dir(domain: str, folder_name: str) -> Path:
    """Where TensorBoard events of one candidate's training go."""
    return settings.runs_dir() / domain / "tensorboard" / folder_name


def default_tracking_uri() -> str:
    """The home's own MLflow store, used when ``MLFLOW_TRACKING_URI`` is not set."""
    return f"sqlite:///{settings.home() / 'mlflow' / 'mlflow.db'}"


def mlflow_tracking_uri() -> str:
    return os.environ.get(TRACKING_URI_ENV) or default_tracking_uri()


def local_artifact_root(tracking_uri: str) -> Path | None:
    """For a SQLite store, the folder beside the database file where its experiments keep artifacts.

    Why: without an explicit location MLflow puts a database store's artifacts in ``./mlruns`` of
    whichever folder the process started in. Other stores (a server, another database) decide for
    themselves: None.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or len(tracking_uri) == len(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    database.parent.mkdir(parents=True, exist_ok=True)
    return database.resolve().parent / "mlartifacts"


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The id of the MLflow experiment ``name``, created when missing (artifacts as :func:`local_artifact_root`)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = local_artifact_root(tracking_uri)
        try:
            return str(client.create_experiment(name, artifact_location=(root / name).as_uri() if root else None))
        except MlflowException:  # created meanwhile by another thread or process: use theirs
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ReportingUnavailableError(
            f"the MLflow experiment {name!r} at {tracking_uri} is deleted: restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or remove it for good (mlflow gc)"
        )
    return str(experiment.experiment_id)


def is_rank_zero() -> bool:
    """True outside DDP and on DDP's rank 0 (torchrun sets ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def training_report(
    trainer: Any, report_to: Sequence[str], *, domain: str, run_name: str, params: Mapping[str, Any]
) -> Iterator[None]:
    """Point the Trainer's reporters at the home (or MLflow's tracking URI) while ``trainer.train()`` runs.

    ``params`` (the domainflow recipe) are logged to MLflow as ``domainflow.<key>``: the Trainer's
    callback logs its own arguments under their plain names, and MLflow refuses a parameter logged
    twice with two values.
    """
    if "tensorboard" in report_to:
        _point_tensorboard(trainer, tensorboard_dir(domain, run_name))
    if "mlflow" not in report_to or not is_rank_zero():
        yield
        return
    import mlflow

    uri = mlflow_tracking_uri()
    if os.environ.get(TRACKING_URI_ENV) != uri:
        mlflow.set_tracking_uri(uri)  # process-wide, and the same value for every domain of this home
    experiment_id = ensure_experiment(mlflow.MlflowClient(uri), domain, uri)
    tags = {"domainflow.domain": domain, "domainflow.candidate_folder": run_name}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags):
        mlflow.log_params({f"domainflow.{key}": value for key, value in params.items() if value is not None})
        yield


def _point_tensorboard(trainer: Any, folder: Path) -> None:
    """Give the Trainer's TensorBoard callback its folder (it reads none from its arguments in transformers 5;
    its environment variable would be shared by every training in the process)."""
    from transformers.integrations import TensorBoardCallback

    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    if not callbacks:
        raise RuntimeError("report_to has tensorboard, but the Trainer made no TensorBoard callback")
    for callback in callbacks:
        callback.logging_dir = str(folder)
