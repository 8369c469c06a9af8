"""The scored-item store: one SQLite file per domain under the domainflow home.

Why SQLite (not Parquet files): appending must be idempotent and crash-safe, and a
database gives both for free. Every item's id is the primary key, so inserting an item
that is already there is a no-op (``INSERT OR IGNORE``): the same batch processed twice
adds nothing. Items are committed in chunks, each chunk one transaction, so a crash
mid-batch leaves whole chunks stored and nothing half-written; the rerun scores only the
ids that are not stored yet. WAL mode lets readers (aggregation, the CLI) work while a
flow writes.

Tables: ``items`` (scored items), ``batches`` (which files were processed, and when they
completed), ``alerts`` (one row per topic and window: a surge is announced once, however
often its window is re-examined).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from domainflow import settings

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id       TEXT PRIMARY KEY,
    ts            TEXT NOT NULL,      -- UTC, ISO 8601, fixed width: sorts as time
    text          TEXT NOT NULL,
    topics        TEXT NOT NULL,      -- JSON list
    label         TEXT NOT NULL,
    score         REAL NOT NULL,
    probs         TEXT NOT NULL,      -- JSON {label: probability}
    model_version INTEGER,
    batch         TEXT NOT NULL,      -- fingerprint of the file that first brought the item
    source        TEXT NOT NULL,      -- "file line N"
    scored_at     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_ts ON items(ts);
CREATE TABLE IF NOT EXISTS batches (
    fingerprint   TEXT PRIMARY KEY,
    path          TEXT NOT NULL,
    rows          INTEGER NOT NULL,
    started_at    TEXT NOT NULL,
    completed_at  TEXT,
    inserted      INTEGER
);
CREATE TABLE IF NOT EXISTS alerts (
    topic         TEXT NOT NULL,
    window_start  TEXT NOT NULL,
    detected_at   TEXT NOT NULL,
    details       TEXT NOT NULL,      -- JSON of the Surge record
    notified      TEXT,               -- webhook outcome
    PRIMARY KEY (topic, window_start)
);
"""


def default_store_path(domain: str) -> Path:
    return settings.home() / "monitoring" / domain / "scores.sqlite"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def ts_text(stamp: pd.Timestamp) -> str:
    """Fixed-width UTC text (microseconds, +00:00), so SQL string order is time order."""
    return stamp.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


class ScoreStore:
    """Scored items, processed batches and announced alerts of one domain."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    def __repr__(self) -> str:
        return f"ScoreStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection whose ``with`` block is one transaction (commit on success, rollback on error)."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed chunk survives a power cut
            with db:
                yield db
        finally:
            db.close()

    # ------------------------------------------------------------------ items

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored already (queried in slices: SQLite limits bound parameters)."""
        found: set[str] = set()
        with self._connect() as db:
            for start in range(0, len(ids), 500):
                part = list(ids[start : start + 500])
                marks = ",".join("?" * len(part))
                found.update(
                    row[0] for row in db.execute(f"SELECT item_id FROM items WHERE item_id IN ({marks})", part)
                )
        return found

    def insert_items(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert scored items in one transaction; ids already present are skipped. Returns rows added."""
        now = _now()
        records = [
            (
                r["item_id"],
                r["ts"],
                r["text"],
                json.dumps(r["topics"], ensure_ascii=False),
                r["label"],
                float(r["score"]),
                json.dumps(r["probs"]),
                r.get("model_version"),
                r["batch"],
                r["source"],
                now,
            )
            for r in rows
        ]
        with self._connect() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO items VALUES (?,?,?,?,?,?,?,?,?,?,?)", records)
            return db.total_changes - before

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def items_between(self, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None) -> pd.DataFrame:
        """Items with ``start <= ts < end`` as a frame (ts parsed to UTC timestamps, topics as lists; no texts)."""
        query, params = "SELECT item_id, ts, topics, label, score, model_version FROM items WHERE 1=1", []
        if start is not None:
            query += " AND ts >= ?"
            params.append(ts_text(start))
        if end is not None:
            query += " AND ts < ?"
            params.append(ts_text(end))
        with self._connect() as db:
            frame = pd.read_sql_query(query + " ORDER BY ts", db, params=params)
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
        frame["topics"] = frame["topics"].map(json.loads)
        return frame

    def time_range(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        with self._connect() as db:
            low, high = db.execute("SELECT MIN(ts), MAX(ts) FROM items").fetchone()
        if low is None:
            return None
        return pd.Timestamp(low).tz_convert("UTC"), pd.Timestamp(high).tz_convert("UTC")

    # ------------------------------------------------------------------ batches

    def batch_completed(self, fingerprint: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT completed_at FROM batches WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return bool(row and row[0])

    def start_batch(self, fingerprint: str, path: str, rows: int) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO batches (fingerprint, path, rows, started_at) VALUES (?,?,?,?)",
                (fingerprint, path, rows, _now()),
            )

    def complete_batch(self, fingerprint: str, inserted: int) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE batches SET completed_at = ?, inserted = COALESCE(inserted, 0) + ? WHERE fingerprint = ?",
                (_now(), inserted, fingerprint),
            )

    # ------------------------------------------------------------------ alerts

    def alert_exists(self, topic: str, window_start: pd.Timestamp) -> bool:
        with self._connect() as db:
            row = db.execute(
                "SELECT 1 FROM alerts WHERE topic = ? AND window_start = ?", (topic, ts_text(window_start))
            ).fetchone()
        return row is not None

    def record_alert(
        self, topic: str, window_start: pd.Timestamp, details: dict[str, Any], notified: str | None = None
    ) -> bool:
        """Store an announced alert; False when this topic and window already had one."""
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO alerts (topic, window_start, detected_at, details, notified) VALUES (?,?,?,?,?)",
                (topic, ts_text(window_start), _now(), json.dumps(details, default=str), notified),
            )
            return cursor.rowcount == 1

    def alerts(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT topic, window_start, detected_at, details, notified FROM alerts ORDER BY window_start, topic"
            ).fetchall()
        return [
            {"topic": t, "window_start": w, **json.loads(details), "detected_at": d, "notified": n}
            for t, w, d, details, n in rows
        ]
