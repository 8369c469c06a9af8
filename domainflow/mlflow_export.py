"""``domainflow registry export DOMAIN --mlflow URI``: a domain's champion as a version in an MLflow model registry.

What one export does, at the tracking/registry server ``URI`` (``http(s)://…``, ``sqlite:///…``, any
store MLflow takes):

1. one MLflow run in the experiment named after the domain (the one training reports to), holding the
   champion's lineage as parameters (candidate, parent, compression, data fingerprints, the training
   recipe as ``run_config.train_config.*``…), its registry metrics as metrics (``test_accuracy``,
   ``validation_macro_f1``, ``speed_texts_per_second_batch32``…), and lineage/metrics/decision/model
   card as artifacts;
2. the model, logged as a ``python_function`` model (:mod:`domainflow.mlflow_pyfunc` says why not the
   ``transformers`` flavor) whose ``predict(texts)`` returns ``label`` and ``score``;
3. a model version of the registered model ``domainflow-<domain>`` (or ``--name``), tagged with the
   domain, the domainflow registry version and the model folder's fingerprint;
4. the alias ``champion`` set to that version, so ``models:/domainflow-<domain>@champion`` is the
   domain's champion.

Exporting the same champion again creates nothing: the version whose tags name the same domain,
registry version and fingerprint is found and the alias is (re)pointed at it. So after
``domainflow registry rollback``, an export moves the alias back to the version exported before.

Nothing is sent when the domain has no champion, is not a text classification domain, or its champion's
files fail their manifest check.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from domainflow.catalog import get_domain
from domainflow.fingerprint import path_fingerprint
from domainflow.registry import ModelRegistry, VersionInfo
from domainflow.spec import ClassificationSpec
from domainflow.tracking import TRACKING_URI_ENV, ReportingUnavailableError, ensure_experiment

DEFAULT_ALIAS = "champion"
TAG_DOMAIN = "domainflow.domain"
TAG_VERSION = "domainflow.version"
TAG_FINGERPRINT = "domainflow.fingerprint"
#: what the pyfunc model needs besides domainflow itself (which is not on a package index: install this project)
RUNTIME_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")
ONNX_PACKAGES = ("onnxruntime",)


class ExportError(RuntimeError):
    """The export could not be made; nothing was registered (a run may have been logged, see the message)."""


class NoChampionError(ExportError):
    """The domain has no champion to export."""


class ExportRefusedError(ExportError):
    """Not exportable from here: a domain of another kind, or mlflow is not installed."""


@dataclass(frozen=True)
class ExportResult:
    domain: str
    domainflow_version: int
    name: str
    model_version: str
    alias: str
    created: bool  # False: this champion was already a version of the model; only the alias was set
    run_id: str | None
    tracking_uri: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_uri": self.model_uri}


def default_model_name(domain: str) -> str:
    return f"domainflow-{domain}"


def export_champion(
    domain: str, tracking_uri: str, *, name: str | None = None, alias: str = DEFAULT_ALIAS
) -> ExportResult:
    """Register ``domain``'s champion at ``tracking_uri`` under ``name`` with ``alias`` (see the module's doc).

    Raises :class:`NoChampionError`, :class:`ExportRefusedError`, :class:`ExportError` (MLflow refused
    or could not be reached) and ``RegistryError`` (the champion's files are damaged).
    """
    spec = get_domain(domain)
    if not isinstance(spec, ClassificationSpec):
        raise ExportRefusedError(
            f"{spec.name} is a {spec.task_kind} domain: only text classification champions export to MLflow "
            "(a ranking champion is a two-tower bundle with no predict(texts) to wrap)"
        )
    registry = ModelRegistry(spec.name)
    champion = registry.load_champion()  # its files checked against the version's manifest
    if champion is None:
        raise NoChampionError(f"no champion for {spec.name}: {registry.no_champion_hint()}; nothing exported")
    name = name or default_model_name(spec.name)
    if "'" in name:
        raise ExportRefusedError(f"model name {name!r}: a registered model name for export has no quote (')")
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ExportRefusedError(
            "exporting to MLflow needs the mlflow package, which is not installed here: pip install -e '.[mlflow]'"
        ) from None
    _check_reachable(tracking_uri)
    fingerprint = path_fingerprint(champion.model_dir)
    try:
        with _tracking_uri(tracking_uri):
            client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            existing = _exported_version(client, name, spec.name, champion.version, fingerprint)
            if existing is not None:
                model_version, run_id, created = str(existing.version), existing.run_id, False
            else:
                model_version, run_id = _log_and_register(client, spec.name, champion, name, fingerprint, tracking_uri)
                created = True
            client.set_registered_model_alias(name, alias, model_version)
    except (MlflowException, ReportingUnavailableError) as exc:  # the latter: the domain's experiment is deleted
        raise ExportError(
            f"MLflow at {tracking_uri} refused the export of {spec.name} v{champion.version}: {exc}"
        ) from exc
    return ExportResult(spec.name, champion.version, name, model_version, alias, created, run_id, tracking_uri)


def _check_reachable(tracking_uri: str, timeout: float = 10.0) -> None:
    """One request to an HTTP(S) server before anything else: any answer will do, no answer fails at once.

    Why: MLflow's client retries a refused connection with backoff for about four minutes (measured)
    before it gives up, which reads as a hang.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as exc:
        raise ExportError(f"cannot reach the MLflow server at {tracking_uri}: {exc}; nothing exported") from exc


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for the export (its fluent logging reads it), then
    put back: an export must not redirect later training reports of the same process."""
    import mlflow

    previous = os.environ.get(TRACKING_URI_ENV)  # mlflow.set_tracking_uri keeps this variable equal to its own
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it (mlflow accepts None)


def _exported_version(client: Any, name: str, domain: str, registry_version: int, fingerprint: str) -> Any:
    """The model version that already holds this champion (same domain, registry version and bytes), or None."""
    wanted = {TAG_DOMAIN: domain, TAG_VERSION: str(registry_version), TAG_FINGERPRINT: fingerprint}
    for candidate in client.search_model_versions(f"name = '{name}'"):
        if all(candidate.tags.get(key) == value for key, value in wanted.items()):
            return candidate
    return None


def _log_and_register(
    client: Any, domain: str, champion: VersionInfo, name: str, fingerprint: str, tracking_uri: str
) -> tuple[str, str]:
    """One run with the champion's lineage, metrics and model; a new version of ``name``. (version, run id)"""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from domainflow import mlflow_model_code
    from domainflow.mlflow_pyfunc import CLASSIFIER_ARTIFACT

    tags = {TAG_DOMAIN: domain, TAG_VERSION: str(champion.version), TAG_FINGERPRINT: fingerprint}
    params = {k: v for k, v in flatten(champion.lineage).items() if len(v) <= MAX_PARAM_VAL_LENGTH}
    metrics = {
        key.replace(".", "_"): float(value)
        for key, value in flatten(champion.metrics, as_text=False).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),  # one column of texts: a list, a Series or a one-column DataFrame
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )
    experiment_id = ensure_experiment(client, domain, tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{domain}-v{champion.version}", tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for extra in ("lineage.json", "metrics.json", "decision.json", "model_card.md"):
            if (champion.path / extra).is_file():
                mlflow.log_artifact(str(champion.path / extra), artifact_path="domainflow")
        with warnings.catch_warnings():  # no input example on purpose: it would load and run the model once more
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=mlflow_model_code.__file__,  # models from code: nothing pickled
                artifacts={CLASSIFIER_ARTIFACT: str(champion.model_dir)},
                signature=signature,
                pip_requirements=requirements(champion.model_dir),
            )
    try:
        client.create_registered_model(name, description=f"domainflow champions of the domain {domain}")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    created = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run.info.run_id,
        tags=tags,
        description=str(champion.decision.get("summary", "")),
        model_id=info.model_id,
    )
    return str(created.version), run.info.run_id


def flatten(record: dict[str, Any], *, as_text: bool = True, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` keys; None dropped; with ``as_text`` every value a string (lists as JSON)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, as_text=as_text, prefix=f"{path}."))
        elif value is not None:
            flat[path] = (value if isinstance(value, str) else json.dumps(value)) if as_text else value
    return flat


def requirements(model_dir: Path) -> list[str]:
    """The pinned packages the pyfunc model imports (as installed here, without a local version label such as
    torch's ``+cpu``, which no package index serves); onnxruntime for an ONNX champion."""
    from domainflow.compression import ONNX_RECIPES
    from domainflow.modeling import read_metadata

    packages = list(RUNTIME_PACKAGES)
    if read_metadata(model_dir).get("compression") in ONNX_RECIPES:
        packages += ONNX_PACKAGES
    pinned = []
    for package in packages:
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")  # no local label (torch's +cpu)
        except PackageNotFoundError:
            continue
    return pinned
