"""Surge detection: is a topic's negative count or share in a window far above its own recent past?

Pure functions over the per-topic, per-window counts of ``aggregation.window_counts``,
so every rule can be tested with hand-made numbers. The rule (``SurgeRule``):

* the window has at least ``min_count`` negative items — a single item, or a few, is
  never an alert, however quiet the topic was before;
* and either its negative **count** exceeds ``mean + k·std + min_excess`` of the topic's
  counts over the previous ``baseline_windows`` windows (silent windows count as 0), or
  its negative **share** exceeds ``mean + k·std + min_share_excess`` of the shares of
  those previous windows that had items (a topic that is always busy surges in share
  before it surges in count);
* with fewer than ``min_history`` earlier windows of data there is no baseline, and no
  judgement.

Why each topic against itself: $TSLA's normal day holds more bearish headlines than a
small cap's worst day, so one global threshold would either miss the small cap or page
someone about Tesla every day.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import pandas as pd
from pydantic import BaseModel

from domainflow.monitoring.aggregation import TOPIC, TOTAL, WINDOW, share_column
from domainflow.monitoring.config import SurgeRule


class Surge(BaseModel):
    """One alert: the topic, the window, what was seen and the baseline it was compared with."""

    topic: str
    window_start: datetime
    window_end: datetime
    negative_label: str
    negative_count: int
    total: int
    share: float
    baseline_windows: int
    baseline_mean: float
    baseline_std: float
    count_threshold: float
    baseline_share_mean: float | None
    baseline_share_std: float | None
    share_threshold: float | None
    rules: list[str]

    def summary(self) -> str:
        reasons = []
        if "count" in self.rules:
            reasons.append(
                f"count {self.negative_count} > threshold {self.count_threshold:.2f} (baseline mean "
                f"{self.baseline_mean:.2f}, std {self.baseline_std:.2f})"
            )
        if "share" in self.rules and self.share_threshold is not None:
            reasons.append(
                f"share {self.share:.0%} > threshold {self.share_threshold:.0%} (baseline mean "
                f"{self.baseline_share_mean or 0.0:.0%})"
            )
        return (
            f"{self.topic}: {self.negative_count} {self.negative_label} of {self.total} items in the window starting "
            f"{self.window_start.isoformat()}: {' and '.join(reasons)}, over the previous {self.baseline_windows} "
            "windows"
        )


def _judge(topic: str, current: pd.Series, history: pd.DataFrame, rule: SurgeRule, negative: str) -> Surge | None:
    count = int(current[negative])
    if count < rule.min_count or len(history) < rule.min_history:
        return None
    past_counts = history[negative].to_numpy(dtype=float)
    mean, std = float(past_counts.mean()), float(past_counts.std())
    count_threshold = mean + rule.k * std + rule.min_excess
    rules = ["count"] if count > count_threshold else []

    past_shares = history.loc[history[TOTAL] > 0, share_column(negative)].to_numpy(dtype=float)
    share = float(current[share_column(negative)])
    share_mean = share_std = share_threshold = None
    if len(past_shares) >= rule.min_history:
        share_mean, share_std = float(past_shares.mean()), float(past_shares.std())
        share_threshold = share_mean + rule.k * share_std + rule.min_share_excess
        if share > share_threshold:
            rules.append("share")
    if not rules:
        return None
    start = pd.Timestamp(current[WINDOW])
    return Surge(
        topic=topic,
        window_start=start.to_pydatetime(),
        window_end=(start + rule.window_delta).to_pydatetime(),
        negative_label=negative,
        negative_count=count,
        total=int(current[TOTAL]),
        share=share,
        baseline_windows=len(history),
        baseline_mean=mean,
        baseline_std=std,
        count_threshold=count_threshold,
        baseline_share_mean=share_mean,
        baseline_share_std=share_std,
        share_threshold=share_threshold,
        rules=rules,
    )


def detect_surges(
    counts: pd.DataFrame, windows: Iterable[pd.Timestamp], rule: SurgeRule, negative_label: str
) -> list[Surge]:
    """Surges among ``windows`` (usually: the windows a batch touched), each judged against the
    ``baseline_windows`` windows before it that ``counts`` holds. Sorted by window, then topic."""
    if negative_label not in counts.columns:
        raise ValueError(f"negative label {negative_label!r} is not a column of the counts ({list(counts.columns)})")
    delta = rule.window_delta
    surges: list[Surge] = []
    by_topic = {str(topic): frame.set_index(WINDOW, drop=False).sort_index() for topic, frame in counts.groupby(TOPIC)}
    for window in sorted(set(pd.Timestamp(w) for w in windows)):
        earliest = window - rule.baseline_windows * delta
        for topic, frame in by_topic.items():
            if window not in frame.index:
                continue
            current = frame.loc[window]
            if not isinstance(current, pd.Series):  # counts hold one row per (topic, window)
                raise ValueError(f"the counts hold window {window} of topic {topic!r} more than once")
            if int(current[negative_label]) < rule.min_count:
                continue  # cheap exit: most topics in most windows
            history = frame[(frame.index >= earliest) & (frame.index < window)]
            surge = _judge(topic, current, history, rule, negative_label)
            if surge is not None:
                surges.append(surge)
    return sorted(surges, key=lambda s: (s.window_start, s.topic))


def baseline_frame(counts: pd.DataFrame, surge: Surge, rule: SurgeRule) -> pd.DataFrame:
    """The topic's rows from the first baseline window through the surge window (for the plot and table)."""
    start = pd.Timestamp(surge.window_start) - rule.baseline_windows * rule.window_delta
    rows = counts[
        (counts[TOPIC] == surge.topic)
        & (counts[WINDOW] >= start)
        & (counts[WINDOW] <= pd.Timestamp(surge.window_start))
    ]
    return rows.sort_values(WINDOW).reset_index(drop=True)


__all__ = ["Surge", "baseline_frame", "detect_surges"]
