"""The retrieval fallback: threshold calibration, the index (no pickles), and the answer policy's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from domainflow.modeling import LoadedClassifier, TextClassifier, load_encoder
from domainflow.retrieval import (
    INDEX_FILES,
    QuestionIndex,
    build_index,
    calibrate_threshold,
    fallback_policy,
    normalized_embeddings,
)

LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]
KNOWN = [
    ("I am still waiting for my new card to arrive", 0),
    ("When will my card be delivered?", 0),
    ("My PIN is blocked, how do I unblock it?", 1),
    ("I entered the wrong PIN too many times", 1),
    ("What exchange rate do you use for euros?", 2),
    ("How is the currency exchange rate calculated?", 2),
]


def test_calibration_picks_the_lowest_similarity_that_keeps_the_target_precision() -> None:
    # Sorted by similarity: 5 right, then 1 wrong (precision 5/6), then right, wrong, wrong.
    similarities = np.array([0.99, 0.97, 0.95, 0.93, 0.91, 0.90, 0.85, 0.80, 0.70])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 0, 0], dtype=bool)
    # Precision at each cut: 1,1,1,1,1,5/6,6/7,6/8,6/9. For 0.85: the lowest cut still >= 0.85 is 0.85 (6/7).
    assert calibrate_threshold(similarities, correct, 0.85, min_support=1) == pytest.approx(0.85)
    assert calibrate_threshold(similarities, correct, 0.95, min_support=1) == pytest.approx(0.91)
    assert calibrate_threshold(similarities, correct, 0.95, min_support=6) is None  # five lucky texts are not enough
    assert calibrate_threshold(np.array([0.5, 0.4]), np.array([False, False]), 0.5, min_support=1) is None
    assert calibrate_threshold(np.array([]), np.array([], dtype=bool), 0.9) is None


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir: Path) -> LoadedClassifier:
    """The 2-layer real MiniLM with an (irrelevant) head: retrieval uses only its embeddings."""
    encoder, tokenizer = load_encoder(str(tiny_model_dir))
    model = TextClassifier(encoder, num_labels=len(LABELS)).eval()
    return LoadedClassifier(model, tokenizer, LABELS, 64, {})


def test_index_finds_paraphrases_and_reloads_identically_without_pickles(
    tiny_loaded: LoadedClassifier, tmp_path: Path
) -> None:
    texts, labels = [t for t, _ in KNOWN], [y for _, y in KNOWN]
    paraphrases = ["my card hasn't arrived yet", "PIN got blocked", "what's your euro exchange rate"]
    index = build_index(tiny_loaded, texts, labels, paraphrases, [0, 1, 2], target_precision=0.9)
    found = index.nearest(normalized_embeddings(tiny_loaded, paraphrases))
    assert [n.label for n in found] == LABELS  # each paraphrase's nearest known question has its intent
    assert all(0.0 < n.similarity <= 1.0 + 1e-6 for n in found)
    assert index.threshold is None  # three calibration texts are under the minimum support: never answer
    assert not any(n.close_enough for n in found)

    index.threshold = 0.5
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(INDEX_FILES)
    assert all(not p.read_bytes().startswith(b"\x80") for p in tmp_path.iterdir())  # no pickle protocol header
    again = QuestionIndex.load(tmp_path)
    reloaded = again.nearest(normalized_embeddings(tiny_loaded, paraphrases))
    assert [(n.question, n.label) for n in reloaded] == [(n.question, n.label) for n in found]
    assert [n.similarity for n in reloaded] == pytest.approx([n.similarity for n in found], abs=2e-3)  # stored as fp16
    assert all(n.close_enough == (n.similarity >= 0.5) for n in reloaded)
    assert QuestionIndex.load(tmp_path / "nowhere") is None


def test_policy_counts_confident_retrieved_and_escalated_texts(tiny_loaded: LoadedClassifier) -> None:
    texts, labels = [t for t, _ in KNOWN], [y for _, y in KNOWN]
    index = build_index(tiny_loaded, texts, labels, [], [], target_precision=0.9)
    index.threshold = 0.99  # only (near-)identical questions are close enough
    queries = [
        "When will my card be delivered?",
        "I entered the wrong PIN too many times",
        "something else entirely",
        "How is the currency exchange rate calculated?",
    ]
    references = [0, 1, 2, 1]
    # Text 0: confident and right. Text 1: unsure, a known question verbatim -> retrieval, right.
    # Text 2: unsure, nothing close -> escalated. Text 3: confident but wrong (predicts 2, truth 1).
    probabilities = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]])
    policy = fallback_policy(index, tiny_loaded, queries, probabilities, references, consult_below=0.5)
    assert policy["answered_confidently"] == pytest.approx(0.5)
    assert policy["confident_accuracy"] == pytest.approx(0.5)
    assert policy["answered_by_retrieval"] == pytest.approx(0.25)
    assert policy["retrieval_precision"] == pytest.approx(1.0)
    assert policy["escalated"] == pytest.approx(0.25)
    assert policy["escalated_without_retrieval"] == pytest.approx(0.5)
    assert policy["answered_accuracy"] == pytest.approx(2 / 3)
    assert policy["similarity_threshold"] == pytest.approx(0.99)
