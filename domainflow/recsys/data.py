"""Read and validate interactions + items tables (MovieLens or a user's own CSV/Parquet/JSON files).

Why strict: every model and every metric downstream trusts these ids and timestamps. A bad row
found here costs a message naming the file, the row and the problem; found after training it
costs a number nobody can explain. All problems are collected and reported together (the first
few of each kind, with a count), so a user fixes a file in one pass.

Accepted columns — interactions: ``user_id``, ``item_id``, ``timestamp`` (number of seconds or an
ISO date-time), optional ``rating`` (number); items: ``item_id``, ``title``, optional ``genres``
(``|``-separated) and ``year``. One repair is made rather than an error raised: a user who
interacted with an item several times keeps only the latest interaction (counted in the report).

Files are read by the project's one reader (:func:`domainflow.data.tables.read_table`), so a
ranking file gets the same format rules and the same "line 12" locations as a classification
file, and its errors are :class:`~domainflow.data.problems.DataValidationError` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from domainflow.data.problems import DataValidationError
from domainflow.data.tables import FORMATS, locations, read_table
from domainflow.recsys.protocol import chronological

__all__ = ["RankingDataError", "find_files", "read_table", "validate"]

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
MAX_LISTED = 10


class RankingDataError(DataValidationError):
    """Interaction or item data that no retry can fix; ``problems`` holds one line per kind.

    A kind of :class:`DataValidationError`, so whatever reports bad data (the CLI's exit code,
    the ingest retry rule) treats both task kinds alike.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message, problems or ())


@dataclass
class Problems:
    """Problems grouped by (file, kind), each with the rows where it occurs."""

    groups: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, source: str, kind: str, where: list[str] | None = None) -> None:
        self.groups.setdefault((source, kind), []).extend(where or [])

    def raise_if_any(self) -> None:
        if not self.groups:
            return
        lines = []
        for (source, kind), where in self.groups.items():
            shown = ", ".join(where[:MAX_LISTED])
            more = f" (and {len(where) - MAX_LISTED} more)" if len(where) > MAX_LISTED else ""
            lines.append(f"{source}: {kind}" + (f" at {shown}{more}" if where else ""))
        raise RankingDataError("invalid recommendation data:\n  " + "\n  ".join(lines), lines)


def _where(frame: pd.DataFrame, source: str) -> list[str]:
    """Each row's location: from the reader's index (``line``/``row``) when the frame came from
    :func:`read_table`; else (a frame built in memory or from recbole's files) CSV/TSV lines
    counting the header as line 1, other formats data rows from 1."""
    if frame.index.name in ("line", "row"):
        return locations(frame)
    if source.endswith((".csv", ".tsv", ".inter", ".item")):
        return [f"line {i + 2}" for i in range(len(frame))]
    return [f"row {i + 1}" for i in range(len(frame))]


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def _id(value: object) -> str:
    if _blank(value):
        return ""
    if isinstance(value, float) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _ids(frame: pd.DataFrame, column: str, source: str, where: list[str], problems: Problems) -> pd.Series:
    """Ids as stripped strings ("7" and 7.0 from a Parquet float column mean the same id)."""
    values = frame[column].map(_id)
    bad = [where[i] for i in np.flatnonzero(values.eq("").to_numpy())]
    if bad:
        problems.add(source, f"empty {column}", bad)
    return values


def _timestamps(frame: pd.DataFrame, source: str, where: list[str], problems: Problems) -> pd.Series:
    """Seconds since the epoch from numbers or ISO date-times; unparseable values are reported."""
    raw = frame["timestamp"]
    if pd.api.types.is_datetime64_any_dtype(raw):  # a Parquet timestamp column: naive times are UTC
        stamps = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        raw = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    numbers = pd.to_numeric(raw, errors="coerce")
    missing = numbers.isna() & ~raw.map(_blank)
    if missing.any():
        parsed = pd.to_datetime(raw[missing].astype(str), errors="coerce", utc=True, format="ISO8601")
        numbers.loc[missing] = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    bad = [where[i] for i in np.flatnonzero(numbers.isna().to_numpy())]
    if bad:
        problems.add(source, "timestamp is not a number of seconds or an ISO date-time", bad)
    return numbers.astype(float)


def validate(
    interactions: pd.DataFrame, items: pd.DataFrame, sources: dict[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Check both tables and return clean copies plus counts of what was repaired.

    Clean interactions: ``user_id`` (str), ``item_id`` (str), ``rating`` (float, NaN when the file
    has none), ``timestamp`` (float seconds). Clean items: ``item_id``, ``title``, ``genres``
    (str, ``|``-separated, may be empty), ``year`` (str, may be empty), in file order.
    """
    problems = Problems()
    inter_src, item_src = sources["interactions"], sources["items"]
    for frame, required, source in ((interactions, INTERACTION_COLUMNS, inter_src), (items, ITEM_COLUMNS, item_src)):
        missing = [c for c in required if c not in frame.columns]
        if missing:
            problems.add(source, f"missing column(s) {missing}; found {list(frame.columns)}")
        elif len(frame) == 0:
            problems.add(source, "no data rows")
    problems.raise_if_any()

    item_where, inter_where = _where(items, item_src), _where(interactions, inter_src)
    item_ids = _ids(items, "item_id", item_src, item_where, problems)
    duplicated = item_ids.duplicated(keep="first") & item_ids.ne("")
    if duplicated.any():
        rows = [f"{item_where[i]} ({item_ids.iloc[i]!r})" for i in np.flatnonzero(duplicated.to_numpy())]
        problems.add(item_src, "duplicate item_id", rows)
    titles = items["title"].map(lambda v: "" if _blank(v) else " ".join(str(v).split()))
    empty_titles = [item_where[i] for i in np.flatnonzero(titles.eq("").to_numpy())]
    if empty_titles:
        problems.add(item_src, "empty title (the text model needs item text)", empty_titles)

    users = _ids(interactions, "user_id", inter_src, inter_where, problems)
    inter_items = _ids(interactions, "item_id", inter_src, inter_where, problems)
    known = set(item_ids)
    unknown = inter_items.ne("") & ~inter_items.isin(known)
    if unknown.any():
        rows = [f"{inter_where[i]} ({inter_items.iloc[i]!r})" for i in np.flatnonzero(unknown.to_numpy())]
        problems.add(inter_src, f"item_id not found in {item_src}", rows)
    timestamps = _timestamps(interactions, inter_src, inter_where, problems)
    if "rating" in interactions.columns:
        ratings = pd.to_numeric(interactions["rating"], errors="coerce")
        bad = [inter_where[i] for i in np.flatnonzero(ratings.isna().to_numpy())]
        if bad:
            problems.add(inter_src, "rating is not a number", bad)
    else:
        ratings = pd.Series(np.nan, index=interactions.index)
    problems.raise_if_any()

    clean_items = pd.DataFrame(
        {
            "item_id": item_ids.to_numpy(),
            "title": titles.to_numpy(),
            "genres": _optional_text(items, "genres"),
            "year": _optional_text(items, "year"),
        }
    )
    clean = pd.DataFrame(
        {
            "user_id": users.to_numpy(),
            "item_id": inter_items.to_numpy(),
            "rating": ratings.astype(float).to_numpy(),
            "timestamp": timestamps.to_numpy(),
        }
    )
    clean = chronological(clean, clean_items["item_id"].tolist())  # the protocol's order; ties by catalogue position
    before = len(clean)
    clean = clean.drop_duplicates(["user_id", "item_id"], keep="last").reset_index(drop=True)
    return clean, clean_items, {"repeat_interactions_dropped": before - len(clean)}


def _optional_text(items: pd.DataFrame, column: str) -> np.ndarray:
    """An optional items column as stripped strings ("" where absent or blank)."""
    if column not in items:
        return np.full(len(items), "", dtype=object)
    return items[column].map(lambda v: "" if _blank(v) else str(v).strip()).to_numpy()


TABLE_SUFFIXES = tuple(FORMATS)  # what the shared reader reads


def find_files(folder: Path) -> dict[str, Path]:
    """``interactions.*`` and ``items.*`` in ``folder`` (one of each, any accepted format)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such data folder: {folder}")
    found: dict[str, Path] = {}
    for stem in ("interactions", "items"):
        matches = [folder / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            expected = ", ".join(stem + suffix for suffix in TABLE_SUFFIXES)
            raise FileNotFoundError(f"{folder}: {what} {stem} file; expected exactly one of {expected}")
        found[stem] = matches[0]
    return found
