"""The project's own `evaluate` metric modules, loaded by path so they work offline.

Each metric lives in ``<name>/<name>.py`` (folder and file names equal, as
``evaluate.load`` expects for a local module).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


@cache
def load_metric(name: str) -> Any:
    """``evaluate.load`` on the local module ``name`` (clear error for an unknown name)."""
    import evaluate

    if name not in available_metrics():
        raise KeyError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}")
    return evaluate.load(str(METRICS_DIR / name))


def compute_metrics(
    names: Sequence[str], predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """All requested metrics at once through ``evaluate.combine``."""
    import evaluate

    combined = evaluate.combine([load_metric(name) for name in names])
    return {
        key: float(value)
        for key, value in combined.compute(predictions=list(predictions), references=list(references)).items()
    }
