"""Ingest: turn a domain's raw train/test files into a validated, content-addressed ``DatasetDict``.

Why this step is strict: every later step (fine-tuning, evaluation, the champion /
challenger comparison) trusts the dataset it is handed. A bad row found here costs a
clear message naming file, line and column; the same row found three steps later costs
an hour of training and a metric nobody can explain. So the data is checked before any
split is carved:

* both files have the spec's text and label columns, and at least one data row;
* every text is a non-empty string; every label is a label name or integer id of the spec;
* no text appears verbatim in both train and test (leakage inflates test metrics);
* no text carries two different labels inside one file;
* every class present in train has at least ``spec.min_examples_per_class`` rows.

Two things are repaired rather than rejected, because the real public splits contain
them and they are harmless once removed: exact duplicate rows inside train (extra copies
are dropped) and train rows that differ from a test row only by case or whitespace
(dropped from train, never from test, so the test set stays the published one).

The output folder is named by a fingerprint of the source bytes plus the split recipe,
and is published with a single rename, so a folder that exists is always complete and a
rerun with the same inputs is free.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Value
from datasets.table import InMemoryTable
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from sklearn.model_selection import train_test_split

from domainflow import settings
from domainflow.fingerprint import file_digest, value_fingerprint
from domainflow.logs import run_logger
from domainflow.records import DatasetRef
from domains import get_domain
from domains.base import DomainSpec
from tasks.caching import CODE_AND_INPUTS

__all__ = [
    "DataValidationError",
    "REPORT_NAME",
    "dataset_summary_markdown",
    "ingest",
    "ingest_dataset",
    "ingest_hub_dataset",
    "read_ingest_report",
    "read_table",
]

#: Bump when the validation or split logic changes what a given input produces, so that
#: content-addressed folders written by older code are not mistaken for new ones.
RECIPE_VERSION = 1
REPORT_NAME = "ingest_report.json"
SPLITS = ("train", "validation", "test")
MAX_LISTED = 10  # problems of one kind listed in an error message; the rest are counted

_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_LOCATION_NOTES = {
    "csv": "CSV line numbers are lines of the file, the header being line 1",
    "jsonl": "JSONL line numbers are lines of the file",
    "json": "JSON rows are 1-based positions of the records",
    "parquet": "Parquet rows are 1-based data rows",
    "hub": "hub rows are 1-based rows of the split",
}


class DataValidationError(ValueError):
    """Input data that no retry can fix.

    The message names the file, the line or row, the column and the problem, so a user
    can fix the data without reading code. ``problems`` holds one line per kind of problem.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        # One positional argument keeps the exception rebuildable from its message,
        # which is how Prefect's JSON serializer restores a failed task's exception.
        super().__init__(message)
        self.problems = list(problems) or [message]


def _clip(text: Any, limit: int = 60) -> str:
    """A short repr for messages: a 2,000-character text must not bury the line number."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# --------------------------------------------------------------------------- problems


@dataclass
class _Problems:
    """Collects problems grouped by (source, column, kind) so one error reports them all.

    Stopping at the first bad row makes a user fix a file one row per run; listing the
    first few of each kind, with a count, shows the pattern at once.
    """

    groups: dict[tuple[str, str | None, str], list[str]] = field(default_factory=dict)
    hints: dict[tuple[str, str | None, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, source: str, column: str | None, kind: str, item: str = "", *, hint: str = "", note: str = "") -> None:
        key = (source, column, kind)
        items = self.groups.setdefault(key, [])
        if item:
            items.append(item)
        if hint:
            self.hints[key] = hint
        if note and note not in self.notes:
            self.notes.append(note)

    def raise_if_any(self) -> None:
        if not self.groups:
            return
        lines = [self._describe(key, items) for key, items in self.groups.items()]
        if len(lines) == 1:
            message = lines[0]
        else:
            message = f"{len(lines)} kinds of data problems:\n- " + "\n- ".join(lines)
        if self.notes:
            message += "\n(" + "; ".join(self.notes) + ")"
        raise DataValidationError(message, problems=lines)

    def _describe(self, key: tuple[str, str | None, str], items: list[str]) -> str:
        source, column, kind = key
        text = source + (f", column {column!r}" if column else "") + f": {kind}"
        if items:
            shown = "; ".join(items[:MAX_LISTED])
            more = f"; … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            text += f" ({len(items)} found): {shown}{more}"
        if key in self.hints:
            text += f". {self.hints[key]}"
        return text


# --------------------------------------------------------------------------- reading


def _format_of(path: Path) -> str:
    """The reader for a file's suffix; an unknown suffix or a missing file is a data error, not a crash."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(_FORMATS))
        raise DataValidationError(f"{path.name}: unsupported file suffix {path.suffix!r} (expected one of {known}); file: {path}")
    if not path.is_file():
        raise DataValidationError(f"{path.name}: no such file: {path}")
    return fmt


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV, JSON, JSONL/NDJSON or Parquet file into a DataFrame, chosen by suffix.

    Values keep their type as written: CSV cells are always ``str`` (an empty cell is
    ``""``, never NaN, so validation sees it), JSON numbers stay numbers so a number
    in a text column is reported instead of silently stringified.

    The index holds where each record came from and ``index.name`` says in which unit:
    ``"line"`` (a line of the file: CSV, header = line 1, and JSONL) or ``"row"``
    (1-based data record: JSON arrays and Parquet). Error messages quote these.
    """
    path = Path(path)
    fmt = _format_of(path)
    reader = {"csv": _read_csv, "json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{path.name}: not UTF-8 text (bad byte at offset {exc.start}); file: {path}") from exc


def _read_csv(path: Path) -> pd.DataFrame:
    """Parse with the csv module so each record's starting line is known exactly.

    Banking77 has quoted texts spanning several lines, so "data row + 1" would point
    users at the wrong line; the reader's own line counter does not.
    """
    problems = _Problems(notes=[_LOCATION_NOTES["csv"]])
    records: list[list[str]] = []
    lines: list[int] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if header is None or not any(cell.strip() for cell in header):
                raise DataValidationError(f"{path.name}: empty file: no header and no data rows; file: {path}")
            duplicated = sorted({name for name in header if header.count(name) > 1})
            if duplicated:
                raise DataValidationError(f"{path.name}: line 1 (header): duplicated column name(s) {duplicated}")
            start = reader.line_num + 1
            for record in reader:
                if record:  # a blank line is no record
                    if len(record) != len(header):
                        problems.add(path.name, None, f"wrong number of fields (the header has {len(header)})", f"line {start} ({len(record)} fields)")
                    else:
                        records.append(record)
                        lines.append(start)
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataValidationError(f"{path.name}: line {reader.line_num}: malformed CSV: {exc}; file: {path}") from exc
    problems.raise_if_any()
    return pd.DataFrame(records, columns=header, index=pd.Index(lines, name="line"), dtype=str)


def _read_jsonl(path: Path) -> pd.DataFrame:
    problems = _Problems(notes=[_LOCATION_NOTES["jsonl"]])
    records: list[Any] = []
    lines: list[int] = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.add(path.name, None, "invalid JSON", f"line {number} (column {exc.colno}: {exc.msg})")
                continue
            records.append(record)
            lines.append(number)
    problems.raise_if_any()
    return _frame_from_records(path, records, lines, "line", _LOCATION_NOTES["jsonl"])


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array of objects (``orient="records"``) or an object of columns (``orient="columns"``)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataValidationError(f"{path.name}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}; file: {path}") from exc
    if isinstance(data, dict) and all(isinstance(values, (list, dict)) for values in data.values()):
        columns = {name: list(values.values()) if isinstance(values, dict) else values for name, values in data.items()}
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise DataValidationError(f"{path.name}: columns of different lengths {sorted(lengths)}; file: {path}")
        size = lengths.pop() if lengths else 0
        data = [{name: values[i] for name, values in columns.items()} for i in range(size)]
    if not isinstance(data, list):
        raise DataValidationError(f"{path.name}: expected a JSON array of objects or an object of columns, found {type(data).__name__}; file: {path}")
    return _frame_from_records(path, data, list(range(1, len(data) + 1)), "row", _LOCATION_NOTES["json"])


def _frame_from_records(path: Path, records: list[Any], locations: list[int], unit: str, note: str) -> pd.DataFrame:
    """Object columns, so a number stays a number and a missing key becomes None (both reported later)."""
    problems = _Problems(notes=[note])
    for record, where in zip(records, locations):
        if not isinstance(record, dict):
            problems.add(path.name, None, "expected a JSON object per record", f"{unit} {where} ({type(record).__name__})")
    problems.raise_if_any()
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    data = {name: pd.Series([record.get(name) for record in records], dtype=object) for name in columns}
    frame = pd.DataFrame(data, columns=list(columns))
    frame.index = pd.Index(locations, name=unit)
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataValidationError(f"{path.name}: unreadable Parquet file: {exc}; file: {path}") from exc
    frame = frame.reset_index(drop=True)
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    return frame


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Table:
    """One loaded input: its frame plus how to name it and its rows in messages."""

    name: str  # shown in messages: a file name, or "dataset:split" for the hub
    source: str  # full path or hub id, for the report
    fmt: str
    frame: pd.DataFrame

    @property
    def unit(self) -> str:
        return str(self.frame.index.name or "row")

    @property
    def note(self) -> str:
        return _LOCATION_NOTES.get(self.fmt, "")

    def where(self) -> list[str]:
        return [f"{self.unit} {i}" for i in self.frame.index]


@dataclass
class _Rows:
    """Validated rows of one split, each with its source location."""

    texts: list[str]
    labels: list[int]
    where: list[str]

    def select(self, positions: Iterable[int]) -> "_Rows":
        positions = list(positions)
        return _Rows([self.texts[i] for i in positions], [self.labels[i] for i in positions], [self.where[i] for i in positions])


@dataclass
class _Prepared:
    train: _Rows
    test: _Rows
    dropped_exact_duplicates: int
    near_duplicates: list[dict[str, str]]


def _normalise(text: str) -> str:
    """The key under which texts differing only by case or whitespace collide."""
    return " ".join(text.lower().split())


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _check_columns(spec: DomainSpec, table: _Table, problems: _Problems) -> None:
    present = [str(column) for column in table.frame.columns]
    missing = [column for column in (spec.text_column, spec.label_column) if column not in present]
    if missing:
        where = "header (line 1)" if table.fmt == "csv" else "all records"
        problems.add(
            table.name,
            None,
            f"missing column(s) {missing} in the {where}; the file has columns {present}",
            hint=f"Domain {spec.name!r} expects text column {spec.text_column!r} and label column {spec.label_column!r}",
        )


def _label_hint(spec: DomainSpec) -> str:
    examples = ", ".join(repr(name) for name in spec.label_names[:5])
    return f"Valid labels are the {spec.num_labels} names of domain {spec.name!r} or their ids 0-{spec.num_labels - 1}, e.g. {examples}"


def _check_rows(spec: DomainSpec, table: _Table, problems: _Problems) -> _Rows:
    """Type-check every text and map every label to its index; report, never coerce."""
    texts: list[str] = []
    labels: list[int] = []
    raw_texts = table.frame[spec.text_column].tolist()  # tolist: numpy scalars -> Python values
    raw_labels = table.frame[spec.label_column].tolist()
    where = table.where()
    for text, label, location in zip(raw_texts, raw_labels, where):
        if not isinstance(text, str):
            shown = "null" if _is_missing(text) else f"{_clip(text)}, {type(text).__name__}"
            problems.add(table.name, spec.text_column, "non-text value", f"{location} ({shown})", note=table.note)
        elif not text.strip():
            problems.add(table.name, spec.text_column, "empty or whitespace-only text", location, note=table.note)
        index = None if _is_missing(label) else spec.label_index(label)
        if index is None:
            shown = "null" if _is_missing(label) else _clip(label)
            problems.add(table.name, spec.label_column, "unknown label", f"{location} ({shown})", hint=_label_hint(spec), note=table.note)
        texts.append(text)
        labels.append(index if index is not None else -1)
    return _Rows(texts, labels, where)


def _check_conflicts(spec: DomainSpec, table: _Table, rows: _Rows, problems: _Problems) -> None:
    """One text with two labels teaches (or scores) a contradiction; case/whitespace variants count as one text."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, text in enumerate(rows.texts):
        groups[_normalise(text)].append(position)
    for positions in groups.values():
        if len({rows.labels[p] for p in positions}) > 1:
            pairs = ", ".join(f"{rows.where[p]} -> {spec.label_names[rows.labels[p]]!r}" for p in positions[:MAX_LISTED])
            problems.add(
                table.name,
                spec.label_column,
                "duplicate text with conflicting labels",
                f"{_clip(rows.texts[positions[0]])}: {pairs}",
                note=table.note,
            )


def _check_leakage(train: _Table, train_rows: _Rows, test: _Table, test_rows: _Rows, column: str, problems: _Problems) -> None:
    """A test text also present in train inflates every metric measured on it.

    Only byte-identical texts are an error: the published Banking77 split has pairs that
    differ by a leading newline or a double space, which are handled as near-duplicates.
    """
    in_test: dict[str, str] = {}
    for text, where in zip(test_rows.texts, test_rows.where):
        in_test.setdefault(text, where)
    for text, where in zip(train_rows.texts, train_rows.where):
        if text in in_test:
            problems.add(
                f"{train.name} / {test.name}",
                column,
                "the same text is in both train and test (leakage)",
                f"{train.name} {where} = {test.name} {in_test[text]}: {_clip(text)}",
                hint="Remove it from one of the files",
                note="; ".join(note for note in dict.fromkeys((train.note, test.note)) if note),
            )


def _drop_exact_duplicates(rows: _Rows) -> tuple[_Rows, list[str]]:
    """Keep the first copy of each text (compared after strip); labels already agree."""
    seen: set[str] = set()
    keep: list[int] = []
    dropped: list[str] = []
    for position, text in enumerate(rows.texts):
        key = text.strip()
        if key in seen:
            dropped.append(rows.where[position])
        else:
            seen.add(key)
            keep.append(position)
    return rows.select(keep), dropped


def _drop_near_duplicates_of_test(train: _Table, train_rows: _Rows, test: _Table, test_rows: _Rows) -> tuple[_Rows, list[dict[str, str]]]:
    """Train rows equal to a test row up to case/whitespace leave train; test is never touched."""
    test_keys: dict[str, int] = {}
    for position, text in enumerate(test_rows.texts):
        test_keys.setdefault(_normalise(text), position)
    keep: list[int] = []
    pairs: list[dict[str, str]] = []
    for position, text in enumerate(train_rows.texts):
        match = test_keys.get(_normalise(text))
        if match is None:
            keep.append(position)
            continue
        pairs.append(
            {
                "train": f"{train.name} {train_rows.where[position]}",
                "test": f"{test.name} {test_rows.where[match]}",
                "train_text": text,
                "test_text": test_rows.texts[match],
            }
        )
    return train_rows.select(keep), pairs


def _absent_classes(spec: DomainSpec, rows: _Rows) -> list[str]:
    present = set(rows.labels)
    return [name for index, name in enumerate(spec.label_names) if index not in present]


def _check_class_sizes(spec: DomainSpec, table: _Table, rows: _Rows) -> None:
    """Too few rows for a class makes its stratified validation slice and its metrics noise."""
    counts = Counter(rows.labels)
    small = sorted((count, label) for label, count in counts.items() if count < spec.min_examples_per_class)
    if small:
        listed = ", ".join(f"{spec.label_names[label]!r} ({count})" for count, label in small)
        problems = _Problems()
        problems.add(
            table.name,
            spec.label_column,
            f"classes with fewer than {spec.min_examples_per_class} training rows (min_examples_per_class), "
            f"counted after removing duplicates",
            listed,
            hint="Add examples, or remove the class's rows altogether (absent classes are allowed)",
        )
        problems.raise_if_any()
    absent = _absent_classes(spec, rows)
    if absent:
        run_logger(__name__).warning(
            "%s: %d of %d classes have no training rows (allowed): %s",
            table.name, len(absent), spec.num_labels, ", ".join(absent[:MAX_LISTED]) + (" …" if len(absent) > MAX_LISTED else ""),
        )


def _validate(spec: DomainSpec, train: _Table, test: _Table) -> _Prepared:
    """Every check in order of cheapness; each stage reports all its problems at once."""
    problems = _Problems()
    for table in (train, test):
        _check_columns(spec, table, problems)
    problems.raise_if_any()
    for table in (train, test):
        if table.frame.empty:
            problems.add(table.name, None, "no data rows (the file is empty or holds only a header)")
    problems.raise_if_any()
    train_rows = _check_rows(spec, train, problems)
    test_rows = _check_rows(spec, test, problems)
    problems.raise_if_any()
    _check_conflicts(spec, train, train_rows, problems)
    _check_conflicts(spec, test, test_rows, problems)
    _check_leakage(train, train_rows, test, test_rows, spec.text_column, problems)
    problems.raise_if_any()

    log = run_logger(__name__)
    train_rows, dropped = _drop_exact_duplicates(train_rows)
    if dropped:
        log.warning("%s: dropped %d duplicate row(s) (same text, same label): %s", train.name, len(dropped), ", ".join(dropped[:MAX_LISTED]))
    train_rows, near = _drop_near_duplicates_of_test(train, train_rows, test, test_rows)
    if near:
        log.warning(
            "dropped %d train row(s) that match a test row up to case/whitespace: %s",
            len(near), "; ".join(f"{pair['train']} ~ {pair['test']}" for pair in near[:MAX_LISTED]),
        )
    _check_class_sizes(spec, train, train_rows)
    absent_test = _absent_classes(spec, test_rows)
    if absent_test:
        log.warning("%s: %d of %d classes have no test rows", test.name, len(absent_test), spec.num_labels)
    return _Prepared(train_rows, test_rows, len(dropped), near)


# --------------------------------------------------------------------------- splitting


def _allocate(sizes: Mapping[int, int], budget: int) -> dict[int, int]:
    """Per-class quotas summing to ``budget``: proportional, but at least 2 (else 1) per class where the budget allows.

    Pure proportional sampling would drop rare classes from a small subsample, and a
    class with one row cannot be stratified into train and validation.
    """
    for floor in (2, 1, 0):
        minimum = {label: min(floor, size) for label, size in sizes.items()}
        if sum(minimum.values()) <= budget:
            break
    spare = {label: sizes[label] - minimum[label] for label in sizes}
    remaining = min(budget - sum(minimum.values()), sum(spare.values()))
    total_spare = max(sum(spare.values()), 1)
    # largest-remainder apportionment of the remaining budget, in exact integer arithmetic
    quotas = {label: minimum[label] + remaining * spare[label] // total_spare for label in sizes}
    remainders = {label: remaining * spare[label] % total_spare for label in sizes}
    leftover = min(budget, sum(sizes.values())) - sum(quotas.values())
    for label in sorted(sizes, key=lambda label: (-remainders[label], label))[:leftover]:
        quotas[label] += 1
    return quotas


def _stratified_subsample(labels: Sequence[int], limit: int | None, seed: int) -> list[int]:
    """Positions of a class-balanced subsample of at most ``limit`` rows, in source order."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    groups: dict[int, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        groups[label].append(position)
    quotas = _allocate({label: len(positions) for label, positions in groups.items()}, limit)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(groups):
        chosen.extend(rng.choice(groups[label], size=quotas[label], replace=False).tolist())
    return sorted(chosen)


def _carve_validation(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, validation) positions, with every class of 2+ rows represented in validation.

    sklearn needs at least as many validation rows as classes; on a small dataset the
    validation slice is therefore enlarged to one row per class rather than failing.
    Classes with a single row stay in train.
    """
    counts = Counter(labels)
    splittable = [p for p, label in enumerate(labels) if counts[label] >= 2]
    singles = [p for p, label in enumerate(labels) if counts[label] < 2]
    classes = len({labels[p] for p in splittable})
    if fraction <= 0 or classes == 0:
        return list(range(len(labels))), []
    wanted = round(fraction * len(splittable))
    size = min(max(wanted, classes), len(splittable) - classes)
    if size > wanted:
        run_logger(__name__).info("validation split enlarged from %d to %d rows so that each of %d classes appears", wanted, size, classes)
    train_pos, validation_pos = train_test_split(
        splittable, test_size=size, stratify=[labels[p] for p in splittable], random_state=seed
    )
    return list(train_pos) + singles, list(validation_pos)


def _split(prepared: _Prepared, fraction: float, max_train: int | None, max_test: int | None, seed: int) -> dict[str, _Rows]:
    """Subsample train (before carving validation, so max_train_samples bounds train+validation) and test."""
    train = prepared.train.select(_stratified_subsample(prepared.train.labels, max_train, seed))
    test = prepared.test.select(_stratified_subsample(prepared.test.labels, max_test, seed))
    train_pos, validation_pos = _carve_validation(train.labels, fraction, seed)
    return {"train": train.select(train_pos), "validation": train.select(validation_pos), "test": test}


# --------------------------------------------------------------------------- output


def _recipe(spec: DomainSpec, max_train: int | None, max_test: int | None, seed: int) -> dict[str, Any]:
    """Everything besides the source bytes that changes what ingest writes."""
    return {
        "version": RECIPE_VERSION,
        "text_column": spec.text_column,
        "label_column": spec.label_column,
        "label_names": list(spec.label_names),
        "validation_fraction": spec.validation_fraction,
        "min_examples_per_class": spec.min_examples_per_class,
        "max_train_samples": max_train,
        "max_test_samples": max_test,
        "seed": seed,
    }


def _test_fingerprint(spec: DomainSpec, rows: _Rows) -> str:
    """Hash of the test split's (text, label name) rows alone: two models are comparable iff it matches."""
    return value_fingerprint("test-split", [[text, spec.label_names[label]] for text, label in zip(rows.texts, rows.labels)])


def _dataset_dict(spec: DomainSpec, splits: Mapping[str, _Rows], fingerprint: str) -> DatasetDict:
    """Explicit features: ``text`` as ``string`` (not pandas' large_string) and ``label`` as a ClassLabel,
    i.e. an int index that carries the spec's label names with it.

    Each split gets a fingerprint derived from ours: left to itself, ``datasets`` hashes the
    whole table with dill, which costs time and, under Prefect's ``log_prints``, dumps the
    bytecode dill disassembles into the run's log.
    """
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(spec.label_names))})
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


def _label_counts(spec: DomainSpec, rows: _Rows) -> dict[str, int]:
    counts = Counter(rows.labels)
    return {spec.label_names[label]: counts[label] for label in sorted(counts)}


def _report(spec: DomainSpec, fingerprint: str, test_fp: str, recipe: dict[str, Any], sources: dict[str, dict[str, Any]],
            prepared: _Prepared, splits: Mapping[str, _Rows]) -> dict[str, Any]:
    return {
        "domain": spec.name,
        "fingerprint": fingerprint,
        "test_fingerprint": test_fp,
        "recipe": recipe,
        "sources": sources,
        "num_rows": {name: len(rows.texts) for name, rows in splits.items()},
        "label_names": list(spec.label_names),
        "label_counts": {name: _label_counts(spec, rows) for name, rows in splits.items()},
        "absent_classes": {name: _absent_classes(spec, rows) for name, rows in splits.items()},
        "dropped_exact_duplicates": prepared.dropped_exact_duplicates,
        "dropped_near_duplicates": len(prepared.near_duplicates),
        "near_duplicates": prepared.near_duplicates[:50],
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


def _publish(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a hidden sibling folder, then rename it into place in one step.

    A crash leaves only a ``.tmp`` folder that never looks finished; if a concurrent run
    published the same fingerprint first, its (identical) folder is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(staging)
        if target.exists() and not _finished(target):
            shutil.rmtree(target)  # not written by this code (it renames whole folders); unusable
        try:
            os.rename(staging, target)
        except OSError:
            if not _finished(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _build(spec: DomainSpec, out_dir: Path, fingerprint: str, recipe: dict[str, Any],
           load: Callable[[], tuple[_Table, _Table]], sources: Callable[[_Table, _Table], dict[str, dict[str, Any]]],
           max_train: int | None, max_test: int | None, seed: int) -> DatasetRef:
    """Shared by files and hub: reuse a finished folder, else validate, split, write, publish."""
    target = Path(out_dir) / fingerprint
    if _finished(target):
        run_logger(__name__).info("dataset %s already ingested at %s", fingerprint, target)
        return _ref_from_report(read_ingest_report(target), target)
    train, test = load()
    prepared = _validate(spec, train, test)
    splits = _split(prepared, spec.validation_fraction, max_train, max_test, seed)
    report = _report(spec, fingerprint, _test_fingerprint(spec, splits["test"]), recipe, sources(train, test), prepared, splits)

    def write(folder: Path) -> None:
        _dataset_dict(spec, splits, fingerprint).save_to_disk(str(folder))
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    _publish(target, write)
    run_logger(__name__).info("ingested %s: %s rows -> %s", spec.name, report["num_rows"], target)
    return _ref_from_report(report, target)


def _check_limits(max_train: int | None, max_test: int | None) -> None:
    for name, value in (("max_train_samples", max_train), ("max_test_samples", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def ingest_dataset(
    spec: DomainSpec,
    out_dir: Path,
    *,
    train_path: Path,
    test_path: Path,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 42,
) -> DatasetRef:
    """Validate the two files and write ``out_dir / <fingerprint>`` (a DatasetDict plus ``ingest_report.json``).

    The fingerprint hashes the files' bytes, their formats and the split recipe (limits,
    seed, validation fraction, label names…), never their paths: moving a file changes
    nothing, editing one byte makes a new dataset. It is computed before reading, so a
    folder that already exists is returned without any work.

    ``max_train_samples`` bounds train + validation (a stratified subsample taken before
    validation is carved); ``max_test_samples`` bounds test. Raises
    :class:`DataValidationError` for any data problem.
    """
    _check_limits(max_train_samples, max_test_samples)
    paths = {"train": Path(train_path), "test": Path(test_path)}
    formats = {split: _format_of(path) for split, path in paths.items()}  # checked before hashing
    digests = {split: file_digest(path) for split, path in paths.items()}
    recipe = _recipe(spec, max_train_samples, max_test_samples, seed)
    fingerprint = value_fingerprint("ingest", digests, formats, recipe)

    def table(split: str) -> _Table:
        path = paths[split]
        return _Table(name=path.name, source=str(path.resolve()), fmt=formats[split], frame=read_table(path))

    def load() -> tuple[_Table, _Table]:
        return table("train"), table("test")

    def sources(train: _Table, test: _Table) -> dict[str, dict[str, Any]]:
        return {
            split: {"path": table.source, "format": table.fmt, "sha256": digests[split], "rows": len(table.frame)}
            for split, table in (("train", train), ("test", test))
        }

    return _build(spec, Path(out_dir), fingerprint, recipe, load, sources, max_train_samples, max_test_samples, seed)


# --------------------------------------------------------------------------- hub


def _hub_frame(spec: DomainSpec, split: Dataset) -> pd.DataFrame:
    """A hub split as a frame of Python values, renamed to the spec's columns, class ids turned into names.

    The hub's integer order for a ClassLabel need not match the spec's label order, so
    ids are mapped to names through the split's own features and validated as names.
    """
    renames = {old: new for old, new in spec.source.hf_column_map.items() if old in split.column_names and old != new}
    if renames:
        split = split.rename_columns(renames)
    columns = split.to_dict()
    for name, feature in split.features.items():
        if isinstance(feature, ClassLabel):
            columns[name] = [feature.int2str(v) if isinstance(v, int) and v >= 0 else None for v in columns[name]]
    frame = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()}, columns=list(columns))
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    return frame


def ingest_hub_dataset(
    spec: DomainSpec,
    out_dir: Path,
    *,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 42,
) -> DatasetRef:
    """Like :func:`ingest_dataset`, for ``spec.source.hf_dataset`` loaded from the Hugging Face hub.

    Needs ``DOMAINFLOW_ONLINE=1``. The fingerprint hashes the loaded rows (not the hub's
    revision string), so a re-uploaded dataset with the same rows maps to the same folder.
    """
    _check_limits(max_train_samples, max_test_samples)
    source = spec.source
    if not source.hf_dataset:
        raise ValueError(f"domain {spec.name!r} names no Hugging Face dataset")
    if not settings.online():
        raise RuntimeError(f"loading {source.hf_dataset!r} needs the network: set DOMAINFLOW_ONLINE=1")
    from datasets import (
        load_dataset,  # imported here: only this path touches the network
    )

    loaded = load_dataset(source.hf_dataset, source.hf_config)
    tables: dict[str, _Table] = {}
    for split, hub_split in (("train", source.hf_train_split), ("test", source.hf_test_split)):
        name = f"{source.hf_dataset}:{hub_split}"
        if hub_split not in loaded:
            raise DataValidationError(f"{name}: the dataset has no split {hub_split!r} (it has {sorted(loaded)})")
        tables[split] = _Table(name=name, source=f"hf://{source.hf_dataset}/{source.hf_config or ''}:{hub_split}", fmt="hub",
                               frame=_hub_frame(spec, loaded[hub_split]))
    digests = {
        split: value_fingerprint([str(c) for c in table.frame.columns], {str(c): table.frame[c].tolist() for c in table.frame.columns})
        for split, table in tables.items()
    }
    recipe = _recipe(spec, max_train_samples, max_test_samples, seed)
    fingerprint = value_fingerprint("ingest", digests, {"train": "hub", "test": "hub"}, recipe)

    def sources(train: _Table, test: _Table) -> dict[str, dict[str, Any]]:
        return {
            split: {"path": table.source, "format": "hub", "content_hash": digests[split], "rows": len(table.frame)}
            for split, table in (("train", train), ("test", test))
        }

    return _build(spec, Path(out_dir), fingerprint, recipe, lambda: (tables["train"], tables["test"]), sources,
                  max_train_samples, max_test_samples, seed)


# --------------------------------------------------------------------------- Prefect


def dataset_summary_markdown(report: Mapping[str, Any], *, extremes: int = 5) -> str:
    """The artifact text: sizes, class balance at both ends, repairs made, fingerprints."""
    counts = report["label_counts"]["train"]
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    lines = [
        f"# Dataset `{report['domain']}`",
        "",
        "| split | rows | classes |",
        "|---|---:|---:|",
    ]
    for split in SPLITS:
        lines.append(f"| {split} | {report['num_rows'][split]} | {len(report['label_counts'][split])} / {len(report['label_names'])} |")
    lines += ["", f"**Most frequent classes (train):** " + ", ".join(f"`{name}` {n}" for name, n in ranked[:extremes])]
    lines += [f"**Least frequent classes (train):** " + ", ".join(f"`{name}` {n}" for name, n in ranked[-extremes:][::-1])]
    absent = report.get("absent_classes", {}).get("train", [])
    if absent:
        lines += [f"**Classes with no training rows:** {len(absent)}"]
    lines += [
        "",
        f"- dropped exact duplicates (train): {report['dropped_exact_duplicates']}",
        f"- dropped near-duplicates of test rows (train): {report['dropped_near_duplicates']}",
        f"- fingerprint: `{report['fingerprint']}`",
        f"- test fingerprint: `{report['test_fingerprint']}`",
    ]
    for split, source in report.get("sources", {}).items():
        lines.append(f"- {split} source: `{source.get('path')}` ({source.get('format')}, {source.get('rows')} rows)")
    return "\n".join(lines) + "\n"


def _artifact_key(domain: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{domain}-dataset".lower()).strip("-")


def _publish_artifact(ref: DatasetRef) -> None:
    """A summary artifact inside a task run; nothing outside one (e.g. ``ingest.fn`` in a test).

    A failed artifact upload is logged, not raised: the dataset is already written.
    """
    if TaskRunContext.get() is None:
        return
    try:
        create_markdown_artifact(
            markdown=dataset_summary_markdown(read_ingest_report(ref.path)),
            key=_artifact_key(ref.domain),
            description=f"Ingested dataset {ref.fingerprint} for {ref.domain}",
        )
    except Exception as exc:  # noqa: BLE001 - a summary must never fail a finished ingest
        run_logger(__name__).warning("could not create the dataset artifact: %s", exc)


def _retry_unless_invalid_data(task: Any, task_run: Any, state: Any) -> bool:
    """Retries help a flaky disk, never a bad row: don't retry a DataValidationError."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - we only inspect its type
            exc = raised
    return not isinstance(exc, DataValidationError)


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
    domain: str,
    train_path: str,
    test_path: str,
    source_fingerprint: str,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 42,
) -> DatasetRef:
    """Prefect wrapper of :func:`ingest_dataset` writing under ``runs/<domain>/datasets/<fingerprint>``.

    ``source_fingerprint`` (the flow's hash of the two files) is unused in the body: it
    is an input so that Prefect's input-based cache key changes when file bytes change
    while their paths do not. The returned fingerprint is recomputed from content anyway.
    """
    spec = get_domain(domain)
    run_logger(__name__).info("ingesting %s (source fingerprint %s)", domain, source_fingerprint)
    ref = ingest_dataset(
        spec,
        settings.runs_dir() / domain / "datasets",
        train_path=Path(train_path),
        test_path=Path(test_path),
        max_train_samples=max_train_samples,
        max_test_samples=max_test_samples,
        seed=seed,
    )
    _publish_artifact(ref)
    return ref
