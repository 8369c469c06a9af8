"""The ingest step as a Prefect task: a thin wrapper of :func:`domainflow.data.dataset.ingest_dataset`.

Everything about the data (reading, validation, labels, splitting, the output folder) lives in
:mod:`domainflow.data`, which knows no domain and no Prefect. What this module adds is what a
pipeline step needs: retries that never retry bad data, a JSON result, a cache key on code and
inputs, and a summary artifact. The task receives the spec's :class:`~domainflow.spec.DataSlice`
as an input instead of looking the domain up by name, so a changed label list or validation
fraction changes the cache key, and the code fingerprint of this module (with everything it
imports) names the output folder, so two code versions never share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from domainflow import settings
from domainflow.data.dataset import dataset_summary_markdown, ingest_dataset, read_ingest_report
from domainflow.data.problems import DataValidationError
from domainflow.data.tables import read_table
from domainflow.logs import run_logger
from domainflow.records import DatasetRef
from domainflow.spec import DataSlice
from tasks.artifacts import artifact_key
from tasks.caching import CODE_AND_INPUTS, SharedPathError, code_fingerprint, require_shared

# DataValidationError and read_table are re-exported for modules not yet switched to domainflow.data.
__all__ = [
    "DataValidationError",
    "dataset_summary_markdown",
    "ingest",
    "ingest_dataset",
    "read_ingest_report",
    "read_table",
]


def _publish_artifact(ref: DatasetRef) -> None:
    """A summary artifact inside a task run; nothing outside one (e.g. ``ingest.fn`` in a test).

    A failed artifact upload is logged, not raised: the dataset is already written.
    """
    if TaskRunContext.get() is None:
        return
    try:
        create_markdown_artifact(
            markdown=dataset_summary_markdown(read_ingest_report(ref.path)),
            key=artifact_key(ref.domain, "dataset"),
            description=f"Ingested dataset {ref.fingerprint} for {ref.domain}",
        )
    except Exception as exc:  # noqa: BLE001 - a summary must never fail a finished ingest
        run_logger(__name__).warning("could not create the dataset artifact: %s", exc)


def _retry_unless_invalid_data(task: Any, task_run: Any, state: Any) -> bool:
    """Retries help a flaky disk, never a bad row or a worker that cannot see the shared home: don't retry a
    DataValidationError or a SharedPathError."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - we only inspect its type
            exc = raised
    return not isinstance(exc, DataValidationError | SharedPathError)


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_invalid_data,
    persist_result=True,
    result_serializer="json",
    cache_policy=CODE_AND_INPUTS,
)
def ingest(
    data: DataSlice,
    domain: str,
    train_path: str,
    test_path: str,
    source_fingerprint: str,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 42,
) -> DatasetRef:
    """Validated, split dataset under ``runs/<domain>/datasets/<fingerprint>``.

    ``source_fingerprint`` (the flow's hash of the two files) is unused in the body: it
    is an input so that Prefect's input-based cache key changes when file bytes change
    while their paths do not. The returned fingerprint is recomputed from content anyway.
    """
    require_shared(train_path, test_path)
    run_logger(__name__).info("ingesting %s (source fingerprint %s)", domain, source_fingerprint)
    ref = ingest_dataset(
        data,
        domain,
        settings.runs_dir() / domain / "datasets",
        train_path=Path(train_path),
        test_path=Path(test_path),
        max_train_samples=max_train_samples,
        max_test_samples=max_test_samples,
        seed=seed,
        code_key=code_fingerprint(__name__),
    )
    _publish_artifact(ref)
    return ref
