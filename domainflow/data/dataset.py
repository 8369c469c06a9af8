"""Ingest: turn a domain's raw train/test files into a validated, content-addressed ``DatasetDict``.

Why content-addressed: every later step names its inputs by fingerprint, so the dataset folder
is named by everything that decides what is in it: the source bytes (never their paths: moving
a file changes nothing, editing one byte makes a new dataset), the data slice of the domain
spec (columns, labels, validation fraction…), the limits and seed, and the code that ingests
(``code_key``): a changed validation rule or a changed label list never reuses an old folder.
The fingerprint is computed before reading, so a folder that exists is returned without any
work; folders are published with :func:`domainflow.atomic.build_atomically`, so one that exists
is complete, and two runs building the same key at once do not clobber each other.

Personal data in the texts (the slice's ``pii`` setting, :mod:`domainflow.pii`) is masked or refused
right after the files are read, before validation: nothing later, not even an error message, sees a
value; the report counts what was masked per file and kind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Value
from datasets.table import InMemoryTable

from domainflow import pii
from domainflow.atomic import build_atomically
from domainflow.data import tables
from domainflow.data.labels import Labels, ids_to_names
from domainflow.data.splitting import SPLITS, split
from domainflow.data.tables import Table, format_of
from domainflow.data.validation import Prepared, Rows, absent_classes, check_split_sizes, validate
from domainflow.fingerprint import file_digest, value_fingerprint
from domainflow.logs import run_logger
from domainflow.records import DatasetRef
from domainflow.spec import DataSlice

__all__ = ["REPORT_NAME", "dataset_summary_markdown", "ingest_dataset", "read_ingest_report"]

REPORT_NAME = "ingest_report.json"
MIB = 2**20
# Slice fields that only accept or refuse data, never change which rows are written: left out of the
# folder's name, so raising a limit reuses the dataset instead of writing an identical one.
ACCEPT_ONLY_FIELDS = frozenset({"max_file_mb", "min_test_rows"})

Loader = Callable[[], tuple[Table, Table]]
Sources = Callable[[Table, Table], dict[str, dict[str, Any]]]


def package_code_key() -> str:
    """Hash of this package's sources: the code part of the key when the caller gives none.

    The Prefect task passes a wider key (every project module it imports); a direct caller
    (a test, a benchmark) still gets a new folder when the ingest code changes.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ingest_recipe(
    data: DataSlice, domain: str, max_train: int | None, max_test: int | None, seed: int, code_key: str | None
) -> dict[str, Any]:
    """Everything besides the source bytes that changes what ingest writes (with ``pii`` on, the detectors'
    library versions too: the slice carries them, see ``DataSlice``)."""
    return {
        "code": code_key or package_code_key(),
        "domain": domain,
        "data": data.model_dump(mode="json", exclude=set(ACCEPT_ONLY_FIELDS)),
        "max_train_samples": max_train,
        "max_test_samples": max_test,
        "seed": seed,
    }


def check_limits(max_train: int | None, max_test: int | None) -> None:
    for name, value in (("max_train_samples", max_train), ("max_test_samples", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _test_fingerprint(labels: Labels, rows: Rows) -> str:
    """Hash of the test split's (text, label name) rows alone: two models are comparable iff it matches."""
    pairs = [[text, labels.names[label]] for text, label in zip(rows.texts, rows.labels)]
    return value_fingerprint("test-split", pairs)


def _dataset_dict(labels: Labels, splits: Mapping[str, Rows], fingerprint: str) -> DatasetDict:
    """Explicit features: ``text`` as ``string`` (not pandas' large_string) and ``label`` as a ClassLabel,
    i.e. an int index that carries the label names with it.

    Each split gets a fingerprint derived from ours: left to itself, ``datasets`` hashes the
    whole table with dill, which costs time and, under Prefect's ``log_prints``, dumps the
    bytecode dill disassembles into the run's log.
    """
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(labels.names))})
    schema = features.arrow_schema
    return DatasetDict(
        {
            name: Dataset(
                InMemoryTable(pa.Table.from_pydict({"text": rows.texts, "label": rows.labels}, schema=schema)),
                info=DatasetInfo(features=features),
                split=name,
                fingerprint=value_fingerprint(fingerprint, name),
            )
            for name, rows in splits.items()
        }
    )


def _label_counts(labels: Labels, rows: Rows) -> dict[str, int]:
    counts = Counter(rows.labels)
    return {labels.names[label]: counts[label] for label in sorted(counts)}


def protect_tables(data: DataSlice, train: Table, test: Table) -> tuple[Table, Table, dict[str, dict[str, int]]]:
    """Both files' texts as the domain's ``pii`` setting lets them through, and the values masked per file and kind.

    Why first, before validation: every later message, log line, report and file shows texts (a leakage pair,
    a conflicting duplicate), so the values must be gone before any of them is made. ``reject`` raises a
    :class:`~domainflow.pii.PiiRejectedError` naming the file, the lines and the kinds, never a value.
    """
    if data.pii == "off":
        return train, test, {}
    counts: dict[str, dict[str, int]] = {}
    protected: list[Table] = []
    for name, table in (("train", train), ("test", test)):
        if data.text_column not in table.frame.columns:  # validation reports the missing column
            protected.append(table)
            continue
        result = pii.protect(
            data.pii,
            table.frame[data.text_column].tolist(),
            table.where(),
            f"{table.name}, column {data.text_column!r}",
            hint='Remove them from the file, or set pii = "mask" in the domain file to replace them by typed '
            "placeholders" + (f" ({table.note})" if table.note else ""),
        )
        frame = table.frame.copy()
        frame[data.text_column] = pd.Series(result.texts, index=frame.index, dtype=object)
        protected.append(Table(name=table.name, source=table.source, fmt=table.fmt, frame=frame))
        counts[name] = result.counts
    return protected[0], protected[1], counts


def _report(
    domain: str,
    fingerprint: str,
    recipe: dict[str, Any],
    sources: dict[str, dict[str, Any]],
    prepared: Prepared,
    splits: Mapping[str, Rows],
    masked: dict[str, dict[str, int]],
) -> dict[str, Any]:
    labels = prepared.labels
    return {
        "domain": domain,
        "fingerprint": fingerprint,
        "test_fingerprint": _test_fingerprint(labels, splits["test"]),
        "recipe": recipe,
        "sources": sources,
        "num_rows": {name: len(rows.texts) for name, rows in splits.items()},
        "label_names": list(labels.names),
        "labels_inferred_from": labels.inferred_from,
        "label_counts": {name: _label_counts(labels, rows) for name, rows in splits.items()},
        "absent_classes": {name: absent_classes(labels, rows) for name, rows in splits.items()},
        "leakage": recipe["data"]["leakage"],
        "dropped_test_overlaps": len(prepared.test_overlaps),
        "test_overlaps": prepared.test_overlaps,  # every train row dropped for its text being in test
        "dropped_exact_duplicates": len(prepared.duplicates),
        "exact_duplicates": prepared.duplicates,  # every extra copy dropped from train
        "pii": recipe["data"].get("pii", "off"),
        "pii_masked": masked,  # values replaced per source file ("train" holds validation too) and kind
    }


def read_ingest_report(dataset_dir: str | Path) -> dict[str, Any]:
    """The ``ingest_report.json`` of a dataset folder written by :func:`ingest_dataset`."""
    return json.loads((Path(dataset_dir) / REPORT_NAME).read_text())


def _ref_from_report(report: Mapping[str, Any], path: Path) -> DatasetRef:
    return DatasetRef(
        domain=report["domain"],
        path=str(path),
        fingerprint=report["fingerprint"],
        test_fingerprint=report["test_fingerprint"],
        num_rows=dict(report["num_rows"]),
        label_names=list(report["label_names"]),
    )


def _finished(target: Path) -> bool:
    """A published folder always has its report: it is written last, before the rename."""
    return (target / REPORT_NAME).is_file()


def build_dataset(
    data: DataSlice,
    domain: str,
    out_root: Path,
    fingerprint: str,
    recipe: dict[str, Any],
    load: Loader,
    sources: Sources,
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> DatasetRef:
    """Shared by files and hub: reuse a finished folder, else validate, split, write, publish."""
    target = Path(out_root) / fingerprint
    log = run_logger(__name__)
    if _finished(target):
        log.info("dataset %s already ingested at %s", fingerprint, target)
        return _ref_from_report(read_ingest_report(target), target)
    train, test, masked = protect_tables(data, *load())
    prepared = validate(data, domain, train, test)
    splits = split(prepared.train, prepared.test, data.validation_fraction, max_train, max_test, seed)
    check_split_sizes(data, prepared.labels, train, test, splits["train"], splits["test"], max_train, max_test)
    report = _report(domain, fingerprint, recipe, sources(train, test), prepared, splits, masked)

    def write(folder: Path) -> None:
        _dataset_dict(prepared.labels, splits, fingerprint).save_to_disk(str(folder))
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    if target.exists() and not _finished(target):
        # Not published by build_atomically (which renames whole folders), so no run is using it.
        shutil.rmtree(target)
    build_atomically(target, write)
    if not _finished(target):
        raise RuntimeError(f"{target} was published without its {REPORT_NAME}")
    log.info("ingested %s: %s rows -> %s", domain, report["num_rows"], target)
    return _ref_from_report(read_ingest_report(target), target)


def ingest_dataset(
    data: DataSlice,
    domain: str,
    out_root: Path,
    *,
    train_path: str | Path,
    test_path: str | Path,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 42,
    code_key: str | None = None,
) -> DatasetRef:
    """Validate the two files and write ``out_root / <fingerprint>`` (a DatasetDict plus ``ingest_report.json``).

    ``max_train_samples`` bounds train + validation (a stratified subsample taken before
    validation is carved); ``max_test_samples`` bounds test. ``code_key`` identifies the code
    that ingests (default: this package's sources). When ``data.label_names`` is None the labels
    are the training file's values, sorted (see :mod:`domainflow.data.labels`), and the returned
    record's ``label_names`` holds them. A file over ``data.max_file_mb`` is refused before it is
    hashed or read; a Parquet file whose labels are a ``datasets`` ClassLabel has its ids mapped by
    their names. Raises :class:`DataValidationError` for any data problem.
    """
    check_limits(max_train_samples, max_test_samples)
    paths = {"train": Path(train_path), "test": Path(test_path)}
    formats = {name: format_of(path) for name, path in paths.items()}  # checked before hashing
    for path in paths.values():
        tables.check_size(path, data.max_file_mb * MIB)  # before hashing too: that reads the whole file
    class_names = {name: _class_label_names(data, paths[name], formats[name]) for name in paths}
    digests = {name: file_digest(path) for name, path in paths.items()}
    plan = ingest_recipe(data, domain, max_train_samples, max_test_samples, seed, code_key)
    fingerprint = value_fingerprint("ingest", digests, formats, plan)

    def table(name: str) -> Table:
        path = paths[name]
        frame = tables.read_table(path, max_bytes=data.max_file_mb * MIB)
        names = class_names[name]
        if names and data.label_column in frame.columns:
            frame[data.label_column] = pd.Series(
                ids_to_names(frame[data.label_column].tolist(), names), index=frame.index, dtype=object
            )
        return Table(name=path.name, source=str(path.resolve()), fmt=formats[name], frame=frame)

    def load() -> tuple[Table, Table]:
        return table("train"), table("test")

    def sources(train: Table, test: Table) -> dict[str, dict[str, Any]]:
        described = {
            name: {"path": table.source, "format": table.fmt, "sha256": digests[name], "rows": len(table.frame)}
            for name, table in (("train", train), ("test", test))
        }
        for name, names in class_names.items():
            if names:
                described[name]["label_ids_mapped_by_name"] = names
        return described

    return build_dataset(
        data, domain, out_root, fingerprint, plan, load, sources, max_train_samples, max_test_samples, seed
    )


def _class_label_names(data: DataSlice, path: Path, fmt: str) -> list[str]:
    """The names a Parquet file gives its label ids (a ``datasets`` ClassLabel), to map its ids by name.

    The file's ids follow its own label order; read as the domain's ids they would relabel rows
    silently whenever the orders differ, so they are turned into names first, as the hub path does.
    """
    if fmt != "parquet":
        return []
    names = tables.class_label_names(path).get(data.label_column, [])
    if names and data.label_names is not None and list(data.label_names) != names:
        run_logger(__name__).info(
            "%s: label ids mapped by the names the file declares (its order differs from the domain's): %s",
            path.name,
            names[:10],
        )
    return names


def dataset_summary_markdown(report: Mapping[str, Any], *, extremes: int = 5) -> str:
    """The artifact text: sizes, class balance at both ends, repairs made, fingerprints."""
    counts = report["label_counts"]["train"]
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    total = len(report["label_names"])
    lines = [
        f"# Dataset `{report['domain']}`",
        "",
        "| split | rows | classes |",
        "|---|---:|---:|",
    ]
    for name in SPLITS:
        lines.append(f"| {name} | {report['num_rows'][name]} | {len(report['label_counts'][name])} / {total} |")
    lines += ["", "**Most frequent classes (train):** " + ", ".join(f"`{n}` {c}" for n, c in ranked[:extremes])]
    lines += ["**Least frequent classes (train):** " + ", ".join(f"`{n}` {c}" for n, c in ranked[-extremes:][::-1])]
    absent = report.get("absent_classes", {}).get("train", [])
    if absent:
        lines += [f"**Classes with no training rows:** {len(absent)}"]
    if report.get("labels_inferred_from"):
        lines += [f"**Labels** taken from `{report['labels_inferred_from']}` (the domain lists none)"]
    lines += [
        "",
        f"- dropped exact duplicates (train): {report.get('dropped_exact_duplicates', 0)}",
        f"- dropped train rows whose text is in test, exactly or up to case/whitespace "
        f"(leakage = {report.get('leakage', 'drop')}): {report.get('dropped_test_overlaps', 0)}",
        f"- personal data (pii = {report.get('pii', 'off')}): {_masked_summary(report.get('pii_masked', {}))}",
        f"- fingerprint: `{report['fingerprint']}`",
        f"- test fingerprint: `{report['test_fingerprint']}`",
    ]
    for name, source in report.get("sources", {}).items():
        lines.append(f"- {name} source: `{source.get('path')}` ({source.get('format')}, {source.get('rows')} rows)")
    return "\n".join(lines) + "\n"


def _masked_summary(masked: Mapping[str, Mapping[str, int]]) -> str:
    """``train file: 3 CARD_NUMBER, 1 EMAIL; test file: none`` (the counts only, never a value)."""
    if not masked:
        return "not scanned"
    parts = []
    for name, counts in masked.items():
        found = ", ".join(f"{count} {kind}" for kind, count in counts.items())
        parts.append(f"{name} file: {found or 'none'} masked")
    return "; ".join(parts)
