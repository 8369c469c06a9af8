"""finance_sentiment: the domain spec, its metrics, its real data, and the unchanged pipeline on a slice.

The pipeline test runs the real flow (ingest → fine-tune → compress → evaluate → deploy)
on 240 real training rows with the real MiniLM cut to two layers, and checks the numbers
the registry stored against predictions recomputed from the champion itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domainflow.catalog import get_domain, list_domains
from domainflow.metrics import compute_metrics
from domainflow.modeling import load_classifier, predict_proba
from domainflow.registry import ModelRegistry
from tests.finance_helpers import LABELS, finance_rows, finance_slice

BEARISH_RECALL = "recall_0"  # bearish is label 0 of the finance_sentiment domain file


def test_domain_is_registered_with_its_knowledge() -> None:
    assert "finance_sentiment" in list_domains()
    spec = get_domain("finance_sentiment")
    assert spec.label_names == LABELS
    assert spec.primary_metric == "macro_f1"
    assert BEARISH_RECALL == "recall_0" and BEARISH_RECALL in spec.gates.min_metrics
    # The published label ids map to the names: 0 bearish, 1 bullish, 2 neutral.
    assert [spec.label_index(v) for v in ("0", "1", "2", 2, "bearish")] == [0, 1, 2, 2, 0]
    assert spec.label_index("3") is None
    assert spec.monitoring.negative_label == "bearish"
    assert spec.respond("bearish", 0.9) == {"signal": "negative"}
    assert spec.respond("neutral", 0.9) == {"signal": "neutral"}
    paths = spec.source.resolve()
    assert paths["train"].name == "train.csv" and paths["test"].name == "valid.csv"
    assert (paths["train"].parent / "LICENSE").read_text().count("MIT") >= 2


def test_per_class_recall_metric() -> None:
    # bearish: 2 of 3 found; bullish: 1 of 1; neutral: 1 of 2.
    predictions = [0, 0, 2, 1, 2, 0]
    references = [0, 0, 0, 1, 2, 2]
    metrics = compute_metrics(("macro_f1", "accuracy", "per_class_recall"), predictions, references)
    assert metrics["recall_0"] == pytest.approx(2 / 3)
    assert metrics["recall_1"] == pytest.approx(1.0)
    assert metrics["recall_2"] == pytest.approx(0.5)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: bearish P=2/3 R=2/3; bullish 1; neutral P=1/2 R=1/2.
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.5) / 3)
    # A class absent from the references gets no key (its recall is undefined, not 0).
    assert "recall_1" not in compute_metrics(("per_class_recall",), [1, 0], [0, 0])


def test_shipped_data_ingests_cleanly(tmp_path: Path) -> None:
    """The full published files pass validation; valid stays the whole test set, validation comes from train."""
    from tasks.ingest import ingest_dataset, read_ingest_report

    spec = get_domain("finance_sentiment")
    paths = spec.source.resolve()
    ref = ingest_dataset(spec.data_slice(), spec.name, tmp_path, train_path=paths["train"], test_path=paths["test"])
    report = read_ingest_report(ref.path)
    assert ref.num_rows["test"] == 2388
    assert report["label_counts"]["test"] == {"bearish": 347, "bullish": 475, "neutral": 1566}
    kept = 9543 - report["dropped_exact_duplicates"] - report["dropped_test_overlaps"]
    assert ref.num_rows["train"] + ref.num_rows["validation"] == kept
    assert ref.num_rows["validation"] == pytest.approx(0.1 * kept, abs=2)
    # stratified: the validation split keeps train's imbalance
    validation = report["label_counts"]["validation"]
    assert validation["neutral"] > validation["bullish"] > validation["bearish"] > 80


def test_pipeline_deploys_a_champion_on_a_slice(tiny_finance: dict) -> None:
    summary, domain = tiny_finance["summary"], tiny_finance["domain"]
    decision = summary["decision"]
    assert decision["promote"] is True, decision["summary"]
    assert decision["primary_metric"] == "macro_f1"
    champion = ModelRegistry(domain).champion()
    assert champion is not None and champion.version == summary["version"]
    names = {row["candidate"] for row in summary["candidates"]}
    assert {"linear_probe", "finetuned"} <= names and any(n.endswith("-int8") for n in names)
    assert summary["dataset"]["num_rows"]["test"] == 90

    # The stored numbers are the champion's own: recompute them from its predictions.
    rows = finance_slice("valid", 30)
    loaded = load_classifier(champion.model_dir)
    assert loaded.label_names == list(LABELS)
    predicted = predict_proba(loaded, [r["text"] for r in rows]).argmax(dim=1).numpy()
    truth = np.array([int(r["label"]) for r in rows])
    stored = champion.metrics["test"]
    assert stored["accuracy"] == pytest.approx(float((predicted == truth).mean()), abs=1e-9)
    assert stored["recall_0"] == pytest.approx(float((predicted[truth == 0] == 0).mean()), abs=1e-9)
    f1s = []
    for label in range(3):
        tp = np.sum((predicted == label) & (truth == label))
        f1s.append(2 * tp / (np.sum(predicted == label) + np.sum(truth == label)))
    assert stored["macro_f1"] == pytest.approx(float(np.mean(f1s)), abs=1e-9)
    # A real model, not a constant: far better than chance (1/3) on balanced classes.
    assert stored["macro_f1"] >= 0.5
    # The gate's table shows the bearish-recall floor the domain declares.
    assert all(0.0 <= row["test_recall_0"] <= 1.0 for row in summary["candidates"])
    card = champion.model_card.read_text()
    assert "| macro_f1 | accuracy | recall_0 | recall_1 | recall_2 |" in card and f"{stored['recall_0']:.4f}" in card
    chosen = next(row for row in summary["candidates"] if row["chosen"])
    assert chosen["test_recall_0"] == pytest.approx(stored["recall_0"])


def test_data_helper_reads_the_published_files() -> None:
    assert len(finance_rows("train")) == 9543 and len(finance_rows("valid")) == 2388
