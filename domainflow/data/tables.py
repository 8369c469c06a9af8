"""Reading a data file (CSV, JSON, JSONL/NDJSON, Parquet) with where each record came from.

Why one reader for the whole project: classification data, ranking interactions/items and
monitoring batches are all user files, and a user should get the same rules (UTF-8 checked,
values kept as written, CSV cells never turned into NaN) and the same kind of location
("line 12" of the file, not "row 10 of a frame") whichever command reads them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from domainflow.data.problems import DataValidationError, Problems

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
LOCATION_NOTES = {
    "csv": "CSV line numbers are lines of the file, the header being line 1",
    "jsonl": "JSONL line numbers are lines of the file",
    "json": "JSON rows are 1-based positions of the records",
    "parquet": "Parquet rows are 1-based data rows",
    "hub": "hub rows are 1-based rows of the split",
}


def format_of(path: Path) -> str:
    """The reader for a file's suffix; an unknown suffix or a missing file is a data error, not a crash."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise DataValidationError(
            f"{path.name}: unsupported file suffix {path.suffix!r} (expected one of {known}); file: {path}"
        )
    if not path.is_file():
        raise DataValidationError(f"{path.name}: no such file: {path}")
    return fmt


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, JSON, JSONL/NDJSON or Parquet file into a DataFrame, chosen by suffix.

    Values keep their type as written: CSV cells are always ``str`` (an empty cell is
    ``""``, never NaN, so validation sees it), JSON numbers stay numbers so a number
    in a text column is reported instead of silently stringified.

    The index holds where each record came from and ``index.name`` says in which unit:
    ``"line"`` (a line of the file: CSV, header = line 1, and JSONL) or ``"row"``
    (1-based data record: JSON arrays and Parquet). Error messages quote these.
    """
    path = Path(path)
    fmt = format_of(path)
    reader = {"csv": _read_csv, "json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"{path.name}: not UTF-8 text (bad byte at offset {exc.start}); file: {path}"
        ) from exc


def locations(frame: pd.DataFrame) -> list[str]:
    """``"line 12"``/``"row 3"`` for each record of a frame from :func:`read_table`."""
    unit = str(frame.index.name or "row")
    return [f"{unit} {i}" for i in frame.index]


@dataclass(frozen=True)
class Table:
    """One loaded input: its frame plus how to name it and its rows in messages."""

    name: str  # shown in messages: a file name, or "dataset:split" for the hub
    source: str  # full path or hub id, for the report
    fmt: str
    frame: pd.DataFrame

    @property
    def note(self) -> str:
        return LOCATION_NOTES.get(self.fmt, "")

    def where(self) -> list[str]:
        return locations(self.frame)


def _read_csv(path: Path) -> pd.DataFrame:
    """Parse with the csv module so each record's starting line is known exactly.

    Banking77 has quoted texts spanning several lines, so "data row + 1" would point
    users at the wrong line; the reader's own line counter does not.
    """
    problems = Problems(notes=[LOCATION_NOTES["csv"]])
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
                        kind = f"wrong number of fields (the header has {len(header)})"
                        problems.add(path.name, None, kind, f"line {start} ({len(record)} fields)")
                    else:
                        records.append(record)
                        lines.append(start)
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataValidationError(
                f"{path.name}: line {reader.line_num}: malformed CSV: {exc}; file: {path}"
            ) from exc
    problems.raise_if_any()
    return pd.DataFrame(records, columns=header, index=pd.Index(lines, name="line"), dtype=str)


def _read_jsonl(path: Path) -> pd.DataFrame:
    problems = Problems(notes=[LOCATION_NOTES["jsonl"]])
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
    return _frame_from_records(path, records, lines, "line", LOCATION_NOTES["jsonl"])


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array of objects (``orient="records"``) or an object of columns (``orient="columns"``)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataValidationError(
            f"{path.name}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}; file: {path}"
        ) from exc
    if isinstance(data, dict) and all(isinstance(values, (list, dict)) for values in data.values()):
        columns = {name: list(v.values()) if isinstance(v, dict) else v for name, v in data.items()}
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise DataValidationError(f"{path.name}: columns of different lengths {sorted(lengths)}; file: {path}")
        size = lengths.pop() if lengths else 0
        data = [{name: values[i] for name, values in columns.items()} for i in range(size)]
    if not isinstance(data, list):
        raise DataValidationError(
            f"{path.name}: expected a JSON array of objects or an object of columns, "
            f"found {type(data).__name__}; file: {path}"
        )
    return _frame_from_records(path, data, list(range(1, len(data) + 1)), "row", LOCATION_NOTES["json"])


def _frame_from_records(path: Path, records: list[Any], places: list[int], unit: str, note: str) -> pd.DataFrame:
    """Object columns, so a number stays a number and a missing key becomes None (both reported later)."""
    problems = Problems(notes=[note])
    for record, where in zip(records, places):
        if not isinstance(record, dict):
            kind = "expected a JSON object per record"
            problems.add(path.name, None, kind, f"{unit} {where} ({type(record).__name__})")
    problems.raise_if_any()
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    data = {name: pd.Series([record.get(name) for record in records], dtype=object) for name in columns}
    frame = pd.DataFrame(data, columns=list(columns))
    frame.index = pd.Index(places, name=unit)
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataValidationError(f"{path.name}: unreadable Parquet file: {exc}; file: {path}") from exc
    frame = frame.reset_index(drop=True)
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    return frame
