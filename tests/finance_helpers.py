"""A tiny finance_sentiment domain on real rows, trained once per test session.

Both finance test modules need a deployed champion (the pipeline test asserts on the run
that makes it; the monitoring tests score with it). The pipeline runs once per session,
whichever module asks first: the summary is kept here, and the registry holds the model.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from domainflow.catalog import get_domain, register
from tests.data_helpers import replace

FINANCE_DIR = Path(__file__).resolve().parent.parent / "data" / "twitter_financial_news_sentiment"
TINY_FINANCE = "fin_tiny"
LABELS = ("bearish", "bullish", "neutral")
_RUNS: dict[str, dict[str, Any]] = {}


def finance_rows(split: str) -> list[dict[str, str]]:
    """All rows of the shipped ``train`` / ``valid`` file (columns text, label)."""
    with open(FINANCE_DIR / f"{split}.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def finance_slice(split: str, per_class: int, skip: int = 0) -> list[dict[str, str]]:
    """Rows ``skip .. skip+per_class`` of each label in file order (labels 0, 1, 2)."""
    rows = finance_rows(split)
    picked = []
    for label in ("0", "1", "2"):
        of_label = [r for r in rows if r["label"] == label][skip : skip + per_class]
        if len(of_label) < per_class:
            raise ValueError(f"{split}.csv has too few rows of label {label}")
        picked.extend(of_label)
    return picked


def write_rows(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in columns} for r in rows)
    return path


def register_tiny_finance() -> str:
    """finance_sentiment with quick training, int8 only, and floors a 2-layer model on 240 rows can meet."""
    spec = get_domain("finance_sentiment")
    register(
        replace(
            spec,
            name=TINY_FINANCE,
            description="Twitter Financial News Sentiment, small slice (tests)",
            gates=replace(spec.gates, min_metrics={"macro_f1": 0.4, "recall_0": 0.3}),
            training=replace(spec.training, epochs=3.0, batch_size=16),
            compression=replace(spec.compression, methods=("dynamic_int8",)),
        )
    )
    return TINY_FINANCE


def write_tiny_finance_data(folder: Path) -> Path:
    """train.csv (80 real rows per class) and valid.csv (30 per class, from the published valid file)."""
    write_rows(folder / "train.csv", finance_slice("train", 80))
    write_rows(folder / "valid.csv", finance_slice("valid", 30))
    return folder


def tiny_finance_pipeline(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Run the real pipeline for the tiny domain once per session; later calls get the same summary."""
    if TINY_FINANCE not in _RUNS:
        from flows.pipeline import domain_pipeline

        _RUNS[TINY_FINANCE] = domain_pipeline(domain=TINY_FINANCE, model=str(model_dir), data_dir=str(data_dir), seed=3)
    return _RUNS[TINY_FINANCE]


@pytest.fixture(scope="session")
def tiny_finance(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny domain's pipeline summary; its champion is in the session's registry."""
    register_tiny_finance()
    data_dir = write_tiny_finance_data(tmp_path_factory.mktemp("finance-slice"))
    summary = tiny_finance_pipeline(tiny_model_dir, data_dir)
    return {"summary": summary, "data_dir": data_dir, "domain": TINY_FINANCE}
