"""A replay for people and tests: a labelled file as a timed stream, with one injected negative surge.

The items of the file (finance: the published ``valid`` split) are shuffled with a seed
and spread evenly over ``windows`` windows; then ``surge_size`` clearly negative
headlines naming one ticker are added inside window ``surge_window``. Each group of
``windows_per_batch`` windows is written as one JSONL batch file (timestamp, text — no
topic: topics are derived, as for real input). Fed to the monitoring flow in order,
the stream must raise exactly one alert: that ticker, that window.

Why the default ticker is the file's most frequent one: it has a real baseline of its
own (ordinary news about it, some of it bearish), so the replay shows the detector
telling a surge from that ticker's normal traffic.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from domainflow.monitoring.config import window_length
from domainflow.monitoring.topics import cashtags

#: Bearish headlines in the dataset's style; "{t}" is the ticker ("$TSLA").
SURGE_TEMPLATES = (
    "{t} shares plunge after earnings miss and guidance cut",
    "{t} downgraded to Sell at Goldman Sachs, price target slashed",
    "{t} tumbles as the company warns of weaker demand",
    "{t} stock sinks after CEO resigns amid accounting probe",
    "{t} cuts full-year outlook; shares drop 12%",
    "{t} falls after regulators open an investigation",
    "{t} slides as analysts cut estimates on margin pressure",
    "{t} misses revenue estimates, shares slump premarket",
    "{t} shares crater after disappointing quarterly results",
    "{t} cut to Underperform at BofA on weak outlook",
    "{t} drops after announcing layoffs and plant closures",
    "{t} plunges as sales decline for a third straight quarter",
    "{t} hit by downgrade at Morgan Stanley, target lowered",
    "{t} sinks on profit warning",
    "{t} shares slump after guidance disappoints",
    "{t} falls sharply as recall weighs on results",
)


@dataclass(frozen=True)
class ReplayPlan:
    """The stream on disk and what it should raise."""

    files: list[Path]
    ticker: str
    surge_window: pd.Timestamp
    surge_items: int
    items: int
    window: str
    start: pd.Timestamp

    def expected(self) -> set[tuple[str, pd.Timestamp]]:
        return {(self.ticker, self.surge_window)}


def most_frequent_ticker(texts: list[str]) -> str:
    counts = Counter(tag for text in texts for tag in cashtags(text))
    if not counts:
        raise ValueError("no cashtag in the replayed texts: name a ticker with --ticker")
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]


def build_replay(
    source: str | Path,
    out_dir: str | Path,
    *,
    text_column: str = "text",
    ticker: str | None = None,
    start: str | pd.Timestamp = "2024-03-04T00:00:00Z",
    window: str = "1h",
    windows: int = 48,
    surge_window: int = 40,
    surge_size: int = 12,
    windows_per_batch: int = 1,
    limit: int | None = None,
    seed: int = 7,
) -> ReplayPlan:
    """Write the replay's batch files into ``out_dir`` and return the plan (see module docstring)."""
    if not 0 <= surge_window < windows:
        raise ValueError(f"surge_window must be in 0..{windows - 1}, got {surge_window}")
    if surge_size < 1 or windows_per_batch < 1:
        raise ValueError("surge_size and windows_per_batch must be at least 1")
    frame = (
        pd.read_csv(source, dtype=str, keep_default_na=False)
        if str(source).endswith(".csv")
        else pd.read_json(source, lines=True, dtype=False)
    )
    if text_column not in frame.columns:
        raise ValueError(f"{source}: no column {text_column!r} (columns: {list(frame.columns)})")
    texts = [t for t in frame[text_column].astype(str).tolist() if t.strip()]
    rng = random.Random(seed)
    rng.shuffle(texts)
    if limit is not None:
        texts = texts[:limit]
    chosen = ticker or most_frequent_ticker(texts)
    chosen = chosen if chosen.startswith("$") else "$" + chosen
    chosen = chosen.upper()

    begin = pd.Timestamp(start)
    begin = (begin.tz_localize("UTC") if begin.tzinfo is None else begin.tz_convert("UTC")).floor(window)
    delta = window_length(window)
    span = delta * windows
    stream = [(begin + span * (i + rng.random()) / len(texts), text) for i, text in enumerate(texts)]
    surge_start = begin + delta * surge_window
    for j in range(surge_size):
        template = SURGE_TEMPLATES[j % len(SURGE_TEMPLATES)]
        stream.append((surge_start + delta * (j + 0.5) / surge_size, template.format(t=chosen)))
    stream.sort(key=lambda item: item[0])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    per_batch = delta * windows_per_batch
    for number in range(-(-windows // windows_per_batch)):
        low, high = begin + per_batch * number, begin + per_batch * (number + 1)
        rows = [{"timestamp": stamp.isoformat(), "text": text} for stamp, text in stream if low <= stamp < high]
        path = out / f"batch-{number + 1:04d}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        if rows:
            files.append(path)
    return ReplayPlan(
        files=files,
        ticker=chosen,
        surge_window=surge_start,
        surge_items=surge_size,
        items=len(stream),
        window=window,
        start=begin,
    )
