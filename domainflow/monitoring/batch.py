"""Reading a batch of new items: validated rows with a stable id, a UTC timestamp and topics.

A batch is a CSV, JSON/JSONL or Parquet file with columns ``timestamp`` and ``text``,
and optionally ``topic`` (one or several, '|'-separated) and ``id``. Every problem is
reported at once with the file, line or row and column, as ingestion does, and nothing
of a bad batch is stored: a half-accepted batch would make "was this file processed?"
unanswerable.

Why each item gets an id before scoring: the store's primary key is what makes a
second processing of the same batch, or of an overlapping one, add nothing. The id is
the file's ``id`` value when it has one, else a hash of (timestamp, text, given topic):
the same headline at the same instant is the same item, whichever file brings it.

Personal data (the domain's ``pii`` setting, see :mod:`domainflow.pii`) is masked before anything
else reads a text, so the store, the Parquet copy of the batch and every message hold the masked
text, and the content hash is taken of it too; ``reject`` refuses the batch naming line and kind.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from domainflow.data.problems import DataValidationError
from domainflow.data.tables import read_table  # the project's one reader: formats, line numbers, UTF-8 checks
from domainflow.monitoring.topics import TopicExtractor, parse_given_topics
from domainflow.pii import PiiMode, PiiRejectedError, protect

TIMESTAMP, TEXT, TOPIC, ID = "timestamp", "text", "topic", "id"
MAX_LISTED = 10


class BatchValidationError(ValueError):
    """A batch file that cannot be monitored as it is; the message names file, line/row, column and problem."""


@dataclass(frozen=True)
class BatchItem:
    item_id: str
    timestamp: pd.Timestamp  # UTC
    text: str
    topics: list[str]
    source: str  # "file.csv line 12"


def _missing(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def parse_timestamp(value: Any) -> pd.Timestamp:
    """ISO 8601 text or epoch seconds (a number, or digits) as a UTC timestamp; naive times are taken as UTC."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    numeric_text = isinstance(value, str) and value.strip().lstrip("-").replace(".", "", 1).isdigit()
    if isinstance(value, (int, float)) or numeric_text:
        stamp = pd.Timestamp(float(value), unit="s", tz="UTC")
    elif isinstance(value, pd.Timestamp):
        stamp = value
    else:
        stamp = pd.Timestamp(str(value).strip())
    if stamp is pd.NaT or pd.isna(stamp):
        raise ValueError("not a time")
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def item_id(explicit: Any, timestamp: pd.Timestamp, text: str, given_topic: str) -> str:
    """The store key: ``id:<value>`` when the file gives ids, else a content hash."""
    if not _missing(explicit):
        return f"id:{str(explicit).strip()}"
    digest = hashlib.sha256("\x1f".join((timestamp.isoformat(), text, given_topic)).encode("utf-8"))
    return "sha256:" + digest.hexdigest()[:32]


def read_batch(path: str | Path, extractor: TopicExtractor, pii: PiiMode = "off") -> tuple[list[BatchItem], int]:
    """Validated items of a batch file (first copy of each id kept) and how many in-file duplicates were dropped.

    Raises :class:`BatchValidationError` listing every bad row (or, with ``pii = "reject"``, every text holding
    personal data).
    """
    path = Path(path)
    try:
        frame = read_table(path)
    except DataValidationError as exc:
        raise BatchValidationError(str(exc)) from None
    unit = str(frame.index.name or "row")
    missing = [c for c in (TIMESTAMP, TEXT) if c not in frame.columns]
    if missing:
        columns = [str(c) for c in frame.columns]
        raise BatchValidationError(
            f"{path.name}: missing column(s) {missing}; the file has columns {columns} "
            f"(a batch needs '{TIMESTAMP}' and '{TEXT}', optionally '{TOPIC}' and '{ID}'); file: {path}"
        )
    if frame.empty:
        raise BatchValidationError(f"{path.name}: no data rows; file: {path}")

    problems: dict[str, list[str]] = {}
    items: list[BatchItem] = []
    seen: dict[str, tuple[str, str]] = {}
    duplicates = 0
    topics_col = frame[TOPIC].tolist() if TOPIC in frame.columns else [None] * len(frame)
    ids_col = frame[ID].tolist() if ID in frame.columns else [None] * len(frame)
    texts = frame[TEXT].tolist()
    try:
        texts = protect(pii, texts, [f"{unit} {i}" for i in frame.index], f"{path.name}, column '{TEXT}'").texts
    except PiiRejectedError as exc:
        raise BatchValidationError(f"{exc}\n(file: {path})") from None
    rows = zip(frame.index, frame[TIMESTAMP].tolist(), texts, topics_col, ids_col, strict=True)
    for location, stamp_raw, text, topic_raw, explicit in rows:
        where = f"{unit} {location}"
        bad = False
        if not isinstance(text, str) or not text.strip():
            problems.setdefault(f"column '{TEXT}': empty or non-text value", []).append(where)
            bad = True
        if _missing(stamp_raw):
            problems.setdefault(f"column '{TIMESTAMP}': missing time", []).append(where)
            continue
        try:
            stamp = parse_timestamp(stamp_raw)
        except (ValueError, TypeError, OverflowError):
            kind = f"column '{TIMESTAMP}': not an ISO 8601 time or epoch seconds"
            problems.setdefault(kind, []).append(f"{where} ({str(stamp_raw)[:40]!r})")
            continue
        if bad:
            continue
        given = parse_given_topics(topic_raw)
        key = item_id(explicit, stamp, text, "|".join(given))
        if key in seen:
            first_where, first_text = seen[key]
            if first_text != text:
                kind = f"column '{ID}': one id for two different texts"
                problems.setdefault(kind, []).append(f"{where} and {first_where} ({key})")
            duplicates += 1
            continue
        seen[key] = (where, text)
        items.append(BatchItem(key, stamp, text, given or extractor(text), f"{path.name} {where}"))
    if problems:
        lines = [_describe(kind, where) for kind, where in problems.items()]
        body = "\n- ".join([f"{len(lines)} kind(s) of problems:", *lines]) if len(lines) > 1 else lines[0]
        raise BatchValidationError(f"{path.name}: {body}\n(file: {path})")
    return items, duplicates


def _describe(kind: str, where: list[str]) -> str:
    """One kind of problem: its count and the first few places."""
    more = f"; … and {len(where) - MAX_LISTED} more" if len(where) > MAX_LISTED else ""
    return f"{kind} ({len(where)} found): {'; '.join(where[:MAX_LISTED])}{more}"
