"""The trend plot of an alert: a topic's labelled items per window, with the threshold it crossed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from domainflow.monitoring.aggregation import TOTAL, WINDOW
from domainflow.monitoring.surge import Surge


def plot_trend(rows: pd.DataFrame, surge: Surge, labels: Sequence[str], path: Path) -> Path:
    """Stacked bars of each label per window (negative label at the bottom, in red), the negative
    count's threshold as a dashed line, and the surge window marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    negative = surge.negative_label
    order = [negative, *(label for label in labels if label != negative)]
    colours = {negative: "tab:red"}
    palette = iter(["tab:green", "tab:gray", "tab:blue", "tab:olive", "tab:purple"])
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    bottom = [0] * len(rows)
    for label in order:
        values = rows[label].astype(int).tolist()
        ax.bar(x, values, bottom=bottom, color=colours.get(label) or next(palette), label=label, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(
        surge.count_threshold,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"{negative} threshold {surge.count_threshold:.1f}",
    )
    ax.axhline(
        surge.baseline_mean,
        color="black",
        linestyle=":",
        linewidth=1,
        label=f"{negative} baseline mean {surge.baseline_mean:.1f}",
    )
    surge_x = len(rows) - 1
    ax.annotate(
        "surge",
        (surge_x, int(rows[TOTAL].iloc[-1])),
        textcoords="offset points",
        xytext=(0, 6),
        ha="center",
        color="tab:red",
        fontweight="bold",
    )
    ax.set_ylim(
        0, max(max(bottom, default=0), surge.count_threshold) * 1.18 + 0.5
    )  # room for the label under the title
    step = max(1, len(rows) // 8)
    ax.set_xticks(
        x[::step],
        labels=[pd.Timestamp(w).strftime("%m-%d %H:%M") for w in rows[WINDOW].iloc[::step]],
        rotation=30,
        fontsize=8,
    )
    ax.set_ylabel("items per window")
    ax.set_title(
        f"{surge.topic}: {negative} surge in the window starting {pd.Timestamp(surge.window_start):%Y-%m-%d %H:%M} UTC"
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
