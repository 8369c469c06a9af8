"""Ingest a Hugging Face hub dataset through the same validation, split and folder as local files.

Why a separate path and not a download to CSV: the hub stores labels as a ClassLabel whose id
order need not match the domain's, so ids are turned into names through the split's own
features and validated as names. Only this module touches the network, and only when
``DOMAINFLOW_ONLINE=1``: offline runs and tests use the shipped files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from datasets import ClassLabel, Dataset

from domainflow import settings
from domainflow.data.dataset import build_dataset, check_limits, ingest_recipe
from domainflow.data.labels import ids_to_names
from domainflow.data.problems import DataValidationError
from domainflow.data.tables import Table
from domainflow.fingerprint import value_fingerprint
from domainflow.records import DatasetRef
from domainflow.spec import DataSlice, DataSource


def hub_frame(source: DataSource, split: Dataset) -> pd.DataFrame:
    """A hub split as a frame of Python values, renamed to the spec's columns, class ids turned into names."""
    renames = {old: new for old, new in source.hf_column_map.items() if old in split.column_names and old != new}
    if renames:
        split = split.rename_columns(renames)
    columns = split.to_dict()
    for name, feature in split.features.items():
        if isinstance(feature, ClassLabel):
            # not int2str: it raises a ValueError on an id past the end, which a pipeline would retry
            columns[name] = ids_to_names(columns[name], feature.names)
    frame = pd.DataFrame(
        {name: pd.Series(values, dtype=object) for name, values in columns.items()}, columns=list(columns)
    )
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    return frame


def ingest_hub_dataset(
    data: DataSlice,
    source: DataSource,
    domain: str,
    out_root: Path,
    *,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 42,
    code_key: str | None = None,
) -> DatasetRef:
    """Like :func:`domainflow.data.dataset.ingest_dataset`, for ``source.hf_dataset`` loaded from the hub.

    Needs ``DOMAINFLOW_ONLINE=1``. The fingerprint hashes the loaded rows (not the hub's
    revision string), so a re-uploaded dataset with the same rows maps to the same folder.
    """
    check_limits(max_train_samples, max_test_samples)
    if not source.hf_dataset:
        raise ValueError(f"domain {domain!r} names no Hugging Face dataset")
    if not settings.online():
        raise RuntimeError(f"loading {source.hf_dataset!r} needs the network: set DOMAINFLOW_ONLINE=1")
    from datasets import load_dataset  # imported here: only this path touches the network

    loaded = load_dataset(source.hf_dataset, source.hf_config)
    loaded_tables: dict[str, Table] = {}
    for name, hub_split in (("train", source.hf_train_split), ("test", source.hf_test_split)):
        shown = f"{source.hf_dataset}:{hub_split}"
        if hub_split not in loaded:
            raise DataValidationError(f"{shown}: the dataset has no split {hub_split!r} (it has {sorted(loaded)})")
        where = f"hf://{source.hf_dataset}/{source.hf_config or ''}:{hub_split}"
        loaded_tables[name] = Table(name=shown, source=where, fmt="hub", frame=hub_frame(source, loaded[hub_split]))
    digests = {name: _frame_digest(table.frame) for name, table in loaded_tables.items()}
    plan = ingest_recipe(data, domain, max_train_samples, max_test_samples, seed, code_key)
    fingerprint = value_fingerprint("ingest", digests, {"train": "hub", "test": "hub"}, plan)

    def sources(train: Table, test: Table) -> dict[str, dict[str, Any]]:
        return {
            name: {"path": table.source, "format": "hub", "content_hash": digests[name], "rows": len(table.frame)}
            for name, table in (("train", train), ("test", test))
        }

    return build_dataset(
        data,
        domain,
        out_root,
        fingerprint,
        plan,
        lambda: (loaded_tables["train"], loaded_tables["test"]),
        sources,
        max_train_samples,
        max_test_samples,
        seed,
    )


def _frame_digest(frame: pd.DataFrame) -> str:
    """Content hash of a loaded split: column names and every value."""
    return value_fingerprint([str(c) for c in frame.columns], {str(c): frame[c].tolist() for c in frame.columns})
