"""Reading a data file (CSV, JSON, JSONL/NDJSON, Parquet) with where each record came from.

Why one reader for the whole project: classification data, ranking interactions/items and
monitoring batches are all user files, and a user should get the same rules (UTF-8 checked,
values kept as written, CSV cells never turned into NaN) and the same kind of location
("line 12" of the file, not "row 10 of a frame") whichever command reads them.

Why text files are decoded whole, before parsing: a decoding error raised by a buffered text
stream carries an offset inside its 8 KiB chunk, not inside the file, so it cannot name a line;
decoding the bytes at once can. JSON is checked for what its parser lets through silently: a
key given twice in one object (the last value would win) and ``\ud800``-style escapes of lone
surrogates, which decode to a Python string that UTF-8, and so Arrow, cannot encode (a crash
at save time, which a pipeline would then retry as if it were transient).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections import Counter
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


def check_size(path: Path, max_bytes: int | None) -> None:
    """Refuse a file over ``max_bytes`` before opening it.

    Every reader holds the whole file in memory (as bytes, then as parsed values), so a file far
    larger than expected, a wrong path or a runaway export, would exhaust memory (and take the
    machine's other work with it) instead of failing with a message.
    """
    if max_bytes is None:
        return
    size = path.stat().st_size
    if size > max_bytes:
        mib = 2**20
        raise DataValidationError(
            f"{path.name}: the file is {size / mib:,.1f} MiB, over the limit of {max_bytes / mib:,.0f} MiB "
            f"(max_file_mb): data files are read whole into memory. Raise max_file_mb in the domain file if "
            f"this machine has the memory, or pass a smaller sample of the data; file: {path}"
        )


def read_table(path: str | Path, *, max_bytes: int | None = None) -> pd.DataFrame:
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
    check_size(path, max_bytes)
    reader = {"csv": _read_csv, "json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
    try:
        return reader(path)
    except UnicodeDecodeError as exc:  # a Parquet string column holding bytes that are not UTF-8
        raise DataValidationError(f"{path.name}: not UTF-8 text ({exc.reason}); file: {path}") from exc


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


def _decode(path: Path) -> str:
    """The file's text (a UTF-8 byte order mark dropped); invalid UTF-8 is reported with its line."""
    raw = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        bad = raw[offset : skip + exc.end].hex(" ")
        raise DataValidationError(
            f"{path.name}: line {line}: not valid UTF-8 text ({exc.reason}: byte(s) {bad} at byte offset {offset}); "
            f"save the file as UTF-8; file: {path}"
        ) from exc


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
SURROGATE_KIND = "text holding a lone surrogate (an escape like \\ud800 with no pair), which is no valid Unicode"
DUPLICATE_KEY_KIND = "a key given twice in one JSON object (the last value would silently win)"


class _Object(dict[str, Any]):
    """A JSON object whose text repeated a key: ``duplicated`` names the repeated keys."""

    duplicated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a plain dict, marked when the object gave a key twice."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Object(pairs)
    marked.duplicated = tuple(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    return marked


def _json_issues(value: Any, duplicated: list[str]) -> bool:
    """Collect the keys repeated in any object inside ``value``; True when a string in it has a lone surrogate."""
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    found = False
    if isinstance(value, dict):
        if isinstance(value, _Object):
            duplicated.extend(key for key in value.duplicated if key not in duplicated)
        for key, item in value.items():
            found = _json_issues(key, duplicated) | _json_issues(item, duplicated) | found
    elif isinstance(value, list):
        for item in value:
            found = _json_issues(item, duplicated) | found
    return found


def _check_json_records(path: Path, records: list[Any], places: list[str], problems: Problems) -> None:
    """Report repeated keys and lone surrogates, one item per record (``places``: "line 3", "row 2 (line 5)")."""
    for record, where in zip(records, places):
        duplicated: list[str] = []
        if _json_issues(record, duplicated):
            problems.add(path.name, None, SURROGATE_KIND, where)
        if duplicated:
            problems.add(path.name, None, DUPLICATE_KEY_KIND, f"{where} ({', '.join(map(repr, duplicated))})")


def _skip_space(text: str, pos: int) -> int:
    match = _JSON_SPACE.match(text, pos)  # the pattern matches the empty string, so always a match
    return match.end() if match else pos


def _array_record_lines(text: str) -> list[int]:
    """The line on which each element of a JSON array starts (the text is known to parse as an array)."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, text.index("[") + 1)
    lines: list[int] = []
    line, counted = 1, 0
    while text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, pos)
        if text[pos] == ",":
            pos = _skip_space(text, pos + 1)
    return lines


def _read_csv(path: Path) -> pd.DataFrame:
    """Parse with the csv module so each record's starting line is known exactly.

    Banking77 has quoted texts spanning several lines, so "data row + 1" would point
    users at the wrong line; the reader's own line counter does not.
    """
    problems = Problems(notes=[LOCATION_NOTES["csv"]])
    records: list[list[str]] = []
    lines: list[int] = []
    with io.StringIO(_decode(path), newline="") as handle:
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
    with io.StringIO(_decode(path), newline=None) as handle:  # universal newlines, as open() in text mode
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_object)
            except json.JSONDecodeError as exc:
                problems.add(path.name, None, "invalid JSON", f"line {number} (column {exc.colno}: {exc.msg})")
                continue
            records.append(record)
            lines.append(number)
    _check_json_records(path, records, [f"line {number}" for number in lines], problems)
    problems.raise_if_any()
    return _frame_from_records(path, records, lines, "line", LOCATION_NOTES["jsonl"])


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array of objects (``orient="records"``) or an object of columns (``orient="columns"``)."""
    text = _decode(path)
    try:
        data = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise DataValidationError(
            f"{path.name}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}; file: {path}"
        ) from exc
    problems = Problems(notes=[LOCATION_NOTES["json"]])
    if isinstance(data, dict) and all(isinstance(values, (list, dict)) for values in data.values()):
        if isinstance(data, _Object):
            problems.add(path.name, None, DUPLICATE_KEY_KIND, f"the object of columns ({', '.join(data.duplicated)})")
        columns = {name: list(v.values()) if isinstance(v, dict) else v for name, v in data.items()}
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise DataValidationError(f"{path.name}: columns of different lengths {sorted(lengths)}; file: {path}")
        size = lengths.pop() if lengths else 0
        data = [{name: values[i] for name, values in columns.items()} for i in range(size)]
        _check_json_records(path, data, [f"row {i}" for i in range(1, size + 1)], problems)
    elif isinstance(data, list):
        _check_json_records(path, data, [f"row {i}" for i in range(1, len(data) + 1)], problems)
        if problems.groups:  # name the lines too: finding them costs a second parse, so only now
            places = [f"row {i} (line {line})" for i, line in enumerate(_array_record_lines(text), start=1)]
            problems = Problems(notes=[LOCATION_NOTES["json"]])
            _check_json_records(path, data, places, problems)
    problems.raise_if_any()
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


def class_label_names(path: str | Path) -> dict[str, list[str]]:
    """The ClassLabel names a Parquet file written by Hugging Face ``datasets`` declares, per column.

    Such a file (``Dataset.to_parquet``, the hub's Parquet exports) stores labels as integer ids
    and their names in the schema metadata: the ids follow the dataset's own order, which need not
    be the domain's, so ingest turns them into names rather than reading them as the domain's ids.
    Any other file (or unreadable metadata) declares none.
    """
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(Path(path)).metadata or {}
        features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, OSError, AttributeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {
        str(name): [str(label) for label in feature["names"]]
        for name, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list)
    }
