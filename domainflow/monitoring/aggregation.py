"""Counts and shares of each label per topic and time window.

Windows are ``Timestamp.floor`` buckets of a fixed length ('1h', '1D', …), left-closed:
an item at 10:00:00 belongs to the 10:00 window. An item with several topics counts
once in each of them; items without a topic count in none.

The grid is complete: every topic seen in the range gets a row for every window of the
range, with zeros where it had no items. Surge baselines depend on that — a ticker
that was silent for a day has a baseline of 0 negative items, not "no baseline".
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

TOPIC, WINDOW, TOTAL = "topic", "window_start", "total"


def window_start(stamps: pd.Series | pd.Timestamp, window: str) -> pd.Series | pd.Timestamp:
    """The window each timestamp falls in."""
    return stamps.dt.floor(window) if isinstance(stamps, pd.Series) else stamps.floor(window)


def window_grid(start: pd.Timestamp, end: pd.Timestamp, window: str) -> pd.DatetimeIndex:
    """Every window from the one holding ``start`` to the one holding ``end`` (both included)."""
    return pd.date_range(start.floor(window), end.floor(window), freq=window, tz="UTC", name=WINDOW)


def share_column(label: str) -> str:
    return f"share_{label}"


def window_counts(
    items: pd.DataFrame, window: str, labels: Sequence[str], windows: pd.DatetimeIndex | None = None
) -> pd.DataFrame:
    """One row per (topic, window): ``total``, a count per label and a ``share_<label>`` per label.

    ``items`` needs columns ``ts`` (UTC timestamps), ``topics`` (lists) and ``label``.
    ``windows`` fixes the grid (default: from the first to the last item's window).
    Shares of an empty window are NaN: 0 of 0 is no evidence either way.
    """
    columns = [TOPIC, WINDOW, TOTAL, *labels, *(share_column(label) for label in labels)]
    unknown = sorted(set(items["label"]) - set(labels)) if len(items) else []
    if unknown:
        raise ValueError(
            f"stored items carry labels {unknown} that are not among {list(labels)}: was the store written by another "
            "domain?"
        )
    exploded = (
        items[["ts", "topics", "label"]].explode("topics").dropna(subset=["topics"]).rename(columns={"topics": TOPIC})
    )
    if windows is None:
        if exploded.empty:
            return pd.DataFrame(columns=columns)
        windows = window_grid(exploded["ts"].min(), exploded["ts"].max(), window)
    exploded[WINDOW] = window_start(exploded["ts"], window)
    exploded = exploded[exploded[WINDOW].isin(windows)]
    topics = sorted(exploded[TOPIC].unique())
    if not topics:
        return pd.DataFrame(columns=columns)
    counts = exploded.groupby([TOPIC, WINDOW, "label"]).size().unstack("label", fill_value=0)
    counts = counts.reindex(columns=list(labels), fill_value=0)
    grid = pd.MultiIndex.from_product([topics, windows], names=[TOPIC, WINDOW])
    counts = counts.reindex(grid, fill_value=0).astype(int)
    counts.columns.name = None
    counts[TOTAL] = counts[list(labels)].sum(axis=1)
    for label in labels:
        counts[share_column(label)] = (counts[label] / counts[TOTAL]).where(counts[TOTAL] > 0)
    return counts.reset_index()[columns]
