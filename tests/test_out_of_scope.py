"""Out-of-scope detection: the calibration keeps its in-scope cost, a domain's own out-of-scope label is
trained and flags its texts, the service escalates what is flagged (and still answers in-scope texts), and
every score puts gibberish above an in-scope text.

Models: the linear probe of the 2-layer real MiniLM on the tiny Banking77 slice (tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import ledoit_wolf

from domainflow.catalog import get_domain, register
from domainflow.data.dataset import ingest_dataset
from domainflow.modeling import embed_texts, load_classifier, predict_proba
from domainflow.outofscope import (
    DETECTOR_FILES,
    SCORE_KINDS,
    ClassStatistics,
    ModelOutputs,
    OutOfScopeDetector,
    model_card_lines,
    model_outputs,
)
from domainflow.records import DatasetRef, Evaluation, ModelRef
from domainflow.registry import ModelRegistry
from domainflow.retrieval import INDEX_FILES
from domainflow.spec import ClassificationSpec, OutOfScopeDetection
from serving import ApiKeys, ServingConfig, create_app
from serving.schemas import PredictResponse
from tasks.evaluate import RETRIEVAL_DIR, evaluate_candidate
from tasks.finetune import make_train_config, train_linear_probe
from tests.conftest import TINY_LABELS
from tests.data_helpers import banking77_slice, replace, write_csv
from tests.process_helpers import ThreadedUvicorn

CHITCHAT = Path(__file__).resolve().parent.parent / "data" / "out_of_scope" / "chitchat.csv"
GIBBERISH = ["qwxz vbnm plokij zzzt", "fjdksla fjdksl xxqq", "zzkrrb wvvq jjjuuu"]
KEY = "oos-test-key-5c1e9a7b3d"
OOS_DOMAIN = "cs_tiny_oos"


def chitchat_lines() -> list[str]:
    return [line for line in CHITCHAT.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]


def detector_of(evaluation: Evaluation) -> OutOfScopeDetector:
    detector = OutOfScopeDetector.load(Path(evaluation.report_dir) / RETRIEVAL_DIR)
    assert detector is not None, "evaluation saved no detector"
    return detector


# ------------------------------------------------------------------------------------ calibration


def test_calibration_keeps_its_cost_on_the_texts_it_was_fit_on_and_is_the_lowest_that_does() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=800)
    logits = rng.normal(size=(800, 5)) * 2.0
    logits[np.arange(800), labels] += rng.normal(1.5, 1.5, size=800)  # mostly right, with a spread of confidence
    logits = logits.astype(np.float32).astype(np.float64)  # what the model hands over: float32
    outputs = ModelOutputs(torch.from_numpy(logits).float())
    correct = logits.argmax(axis=1) == labels
    independent = {
        "energy": -logsumexp(logits, axis=1),
        "max_softmax": 1.0 - softmax(logits, axis=1).max(axis=1),
    }
    for kind, scores in independent.items():
        for max_cost in (0.01, 0.05):
            detector = OutOfScopeDetector.calibrated(kind, outputs, labels.tolist(), max_cost)
            assert detector.scores(outputs) == pytest.approx(scores, abs=1e-4)
            cost = np.mean(correct & (scores > detector.threshold + 1e-9))  # rounding aside
            assert cost <= max_cost, (kind, max_cost, cost)
            assert detector.calibration["validation_in_scope_cost"] == pytest.approx(cost)
            # The lowest threshold: flagging the texts scored exactly at it as well would cost too much.
            assert np.mean(correct & (scores >= detector.threshold - 1e-9)) > max_cost, (kind, max_cost)


def test_mahalanobis_and_cosine_scores_are_the_distances_to_the_nearest_in_scope_centroid() -> None:
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 16)) * 3.0
    labels = np.repeat(np.arange(4), 40)
    points = centres[labels] + rng.normal(size=(160, 16))
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    # Class 3 plays the domain's out-of-scope label: it must have no centroid.
    statistics = ClassStatistics.fit(torch.from_numpy(unit), labels.tolist(), classes=[0, 1, 2])
    queries = rng.normal(size=(10, 16)) * 3.0
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    outputs = ModelOutputs(torch.zeros(10, 4), torch.from_numpy(queries).float())

    means = np.stack([unit[labels == k].mean(axis=0) for k in range(3)])
    in_scope = labels < 3
    covariance, _ = ledoit_wolf(unit[in_scope] - means[labels[in_scope]], assume_centered=True)
    precision = np.linalg.inv(covariance)
    differences = unit_queries[:, None, :] - means[None]
    mahalanobis = np.einsum("nkd,de,nke->nk", differences, precision, differences).min(axis=1)
    cosine = 1.0 - (unit_queries @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T).max(axis=1)

    detector = OutOfScopeDetector("mahalanobis", 0.0, statistics, label_index=3)
    assert detector.scores(outputs) == pytest.approx(mahalanobis, rel=1e-3)
    assert OutOfScopeDetector("cosine", 0.0, statistics).scores(outputs) == pytest.approx(cosine, abs=1e-5)
    with pytest.raises(ValueError, match="needs class statistics"):
        OutOfScopeDetector("mahalanobis", 0.0)
    with pytest.raises(ValueError, match="unknown out-of-scope score"):
        OutOfScopeDetector("entropy", 0.0)


def test_a_domain_must_name_a_label_it_has() -> None:
    spec = get_domain("customer_service").as_kind(ClassificationSpec)
    assert spec.out_of_scope is not None and spec.out_of_scope.enabled  # customer_service turns it on
    with pytest.raises(ValueError, match="out_of_scope.label 'oos' is not a label"):
        spec.replace(out_of_scope=OutOfScopeDetection(label="oos"))
    with pytest.raises(FileNotFoundError, match="eval_files do not exist"):
        spec.replace(out_of_scope=OutOfScopeDetection(eval_files=("nowhere.csv",))).evaluation_slice()
    assert spec.replace(out_of_scope=OutOfScopeDetection(enabled=False)).evaluation_slice().out_of_scope is None


# ------------------------------------------------------------------------------------ a detector on a real model


@pytest.fixture(scope="module")
def oos_domain(tiny_domain: str) -> str:
    """The tiny domain with detection on, measured against 40 chit-chat texts."""
    spec = get_domain(tiny_domain)
    register(
        replace(
            spec,
            name=OOS_DOMAIN,
            out_of_scope=OutOfScopeDetection(eval_files=(str(CHITCHAT),), eval_sample=40, max_in_scope_cost=0.05),
        )
    )
    return OOS_DOMAIN


@pytest.fixture(scope="module")
def probe(tiny_probe: ModelRef) -> ModelRef:
    """The six-intent linear probe of the 2-layer MiniLM (tests/conftest.py)."""
    return tiny_probe


@pytest.fixture(scope="module")
def evaluated(oos_domain: str, probe: ModelRef, tiny_dataset: DatasetRef, tmp_path_factory) -> Evaluation:
    slice_ = get_domain(oos_domain).evaluation_slice()
    return evaluate_candidate(probe, tiny_dataset, slice_, tmp_path_factory.mktemp("oos-report"))


def test_evaluation_calibrates_on_validation_and_measures_test_and_the_eval_file(
    evaluated: Evaluation, probe: ModelRef, tiny_dataset: DatasetRef
) -> None:
    from datasets import load_from_disk

    detector = detector_of(evaluated)
    assert detector.kind == "mahalanobis" and detector.label_index is None
    files = {p.name for p in (Path(evaluated.report_dir) / RETRIEVAL_DIR).iterdir()}
    assert files == set(INDEX_FILES) | set(DETECTOR_FILES)  # what deploy ships with the model

    # The cost on the validation texts it was fit on, from predictions made here by another path.
    splits = load_from_disk(tiny_dataset.path)
    loaded = load_classifier(probe.path)
    validation = list(splits["validation"]["text"])
    correct = predict_proba(loaded, validation).argmax(dim=1).numpy() == np.asarray(splits["validation"]["label"])
    embeddings = embed_texts(loaded.model, loaded.tokenizer, validation, loaded.max_length)
    flagged, _ = detector.flags(ModelOutputs(predict_proba(loaded, validation).log(), embeddings))
    assert np.mean(correct & flagged) <= 0.05
    assert detector.calibration["validation_in_scope_cost"] == pytest.approx(np.mean(correct & flagged))

    figures = evaluated.out_of_scope
    test_texts, references = list(splits["test"]["text"]), np.asarray(splits["test"]["label"])
    test_flags, _ = detector.flags(model_outputs(loaded, test_texts, with_embeddings=True))
    test_correct = predict_proba(loaded, test_texts).argmax(dim=1).numpy() == references
    assert figures["threshold"] == detector.threshold and figures["in_scope_texts"] == len(test_texts)
    assert figures["in_scope_accuracy"] == pytest.approx(evaluated.test_metrics["accuracy"])
    assert figures["false_alarm_rate"] == pytest.approx(test_flags.mean())
    assert figures["in_scope_cost"] == pytest.approx(np.mean(test_correct & test_flags))
    assert figures["out_of_scope_texts"] == 40
    assert figures["out_of_scope_recall"] == figures["out_of_scope_recall/out_of_scope/chitchat"]
    assert 0.5 < figures["auroc"] <= 1.0  # better than chance at telling chit-chat from banking questions
    # The answer policy escalates what is flagged, and says how much.
    assert evaluated.answer_policy["escalated_out_of_scope"] == pytest.approx(test_flags.mean())
    assert json.loads((Path(evaluated.report_dir) / "metrics.json").read_text())["out_of_scope"] == figures
    card = "\n".join(model_card_lines(figures, get_domain(OOS_DOMAIN).out_of_scope))
    assert f"Out-of-scope recall {figures['out_of_scope_recall']:.1%} of 40 texts" in card, card


def test_every_score_puts_gibberish_above_an_in_scope_text(
    probe: ModelRef, tiny_dataset: DatasetRef, evaluated: Evaluation
) -> None:
    from datasets import load_from_disk

    loaded = load_classifier(probe.path)
    statistics = detector_of(evaluated).statistics
    train = load_from_disk(tiny_dataset.path)["train"]
    texts, labels = list(train["text"]), np.asarray(train["label"])
    outputs = model_outputs(loaded, texts, with_embeddings=True)
    surest = int(
        (outputs.probabilities.max(dim=1).values * (outputs.logits.argmax(dim=1) == torch.from_numpy(labels))).argmax()
    )
    far = model_outputs(loaded, GIBBERISH, with_embeddings=True)
    for kind in SCORE_KINDS:
        detector = OutOfScopeDetector(kind, 0.0, statistics)
        in_scope = detector.scores(model_outputs(loaded, [texts[surest]], with_embeddings=True))[0]
        assert (detector.scores(far) > in_scope).all(), (kind, texts[surest], in_scope, detector.scores(far))


# ------------------------------------------------------------------------------------ the service


def test_the_service_escalates_out_of_scope_texts_and_answers_in_scope_ones(
    oos_domain: str,
    probe: ModelRef,
    evaluated: Evaluation,
    tiny_dataset: DatasetRef,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datasets import load_from_disk

    detector = detector_of(evaluated)
    loaded = load_classifier(probe.path)
    train = load_from_disk(tiny_dataset.path)["train"]
    texts, labels = list(train["text"]), list(train["label"])
    outputs = model_outputs(loaded, texts, with_embeddings=True)
    flagged, scores = detector.flags(outputs)
    confident = outputs.probabilities.max(dim=1).values.numpy() >= 0.5
    right = outputs.logits.argmax(dim=1).numpy() == np.asarray(labels)
    answerable = np.nonzero(right & confident & ~flagged)[0]
    assert answerable.size, "the probe answers none of its own training texts"
    in_scope = texts[int(answerable[np.argmin(scores[answerable])])]

    root = tmp_path / "registry"
    report = Path(evaluated.report_dir) / RETRIEVAL_DIR
    ModelRegistry(oos_domain, root=root / oos_domain).promote(
        Path(probe.path),
        metrics={"test": evaluated.test_metrics},
        lineage={"candidate": probe.name},
        decision={"summary": "test promotion"},
        model_extras=[report / name for name in (*INDEX_FILES, *DETECTOR_FILES)],
    )
    spec = get_domain(oos_domain).as_kind(ClassificationSpec)
    server = ThreadedUvicorn(
        create_app(ServingConfig(registry_root=root, domains=(oos_domain,)), api_keys=ApiKeys([KEY]))
    ).start()
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as client:
            response = client.post(f"/v1/{oos_domain}/predict", json={"texts": [GIBBERISH[0], in_scope]})
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    far, near = response.json()["predictions"]
    parsed = PredictResponse.model_validate(response.json())  # additive fields: the schema still holds
    assert [p.out_of_scope for p in parsed.predictions] == [True, False]

    expected = detector.scores(model_outputs(loaded, [GIBBERISH[0], in_scope], with_embeddings=True))
    assert far["out_of_scope"] is True and far["out_of_scope_score"] == pytest.approx(expected[0], rel=1e-3)
    assert far["out_of_scope_score"] > detector.threshold
    assert (far["action"], far["reply"]) == ("escalate", spec.answers.escalation_reply)
    assert "nearest_question" not in far  # never handed to the retrieval fallback
    assert near["out_of_scope"] is False and near["out_of_scope_score"] == pytest.approx(expected[1], rel=1e-3)
    assert near["label"] == loaded.label_names[labels[texts.index(in_scope)]]
    assert (near["action"], near["reply"]) == ("reply", spec.answers.replies[near["label"]])

    # `domainflow predict` decides as the service does
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path))  # its registry: the one promoted into above
    result = CliRunner().invoke(app, ["predict", oos_domain, GIBBERISH[0], in_scope])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)["predictions"]
    assert [(a["out_of_scope"], a["action"]) for a in answers] == [(True, "escalate"), (False, "reply")]


# ------------------------------------------------------------------------------------ a domain's own oos label


def test_an_out_of_scope_label_in_the_data_is_trained_and_flags_its_texts(
    tiny_domain: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    chitchat = chitchat_lines()
    data = tmp_path / "data"
    data.mkdir()
    oos_train = [{"text": text, "category": "oos"} for text in chitchat[:72:3]]  # 24, like each intent
    oos_test = [{"text": text, "category": "oos"} for text in chitchat[100:136:3]]  # 12 others
    write_csv(data / "train.csv", banking77_slice("train", TINY_LABELS, 24) + oos_train)
    write_csv(data / "test.csv", banking77_slice("test", TINY_LABELS, 12) + oos_test)
    base = get_domain(tiny_domain).as_kind(ClassificationSpec)
    labels = (*TINY_LABELS, "oos")
    spec = base.replace(
        name="cs_tiny_oos_label",
        label_names=labels,
        answers=base.answers.replace(replies={k: v for k, v in base.answers.replies.items() if k in labels}),
        out_of_scope=OutOfScopeDetection(label="oos", max_in_scope_cost=0.05),
    )
    dataset = ingest_dataset(
        spec.data_slice(), spec.name, tmp_path / "dataset", train_path=data / "train.csv", test_path=data / "test.csv"
    )
    config = make_train_config(spec, str(tiny_model_dir), epochs=1.0, seed=7)
    candidate = train_linear_probe(dataset, config, tmp_path / "probe")
    evaluation = evaluate_candidate(candidate, dataset, spec.evaluation_slice(), tmp_path / "report")

    detector = detector_of(evaluation)
    oos = labels.index("oos")
    assert detector.label_index == oos and detector.statistics is not None
    assert detector.statistics.whitened_centroids.shape[0] == len(TINY_LABELS)  # no centroid for "oos"

    from datasets import load_from_disk

    test = load_from_disk(dataset.path)["test"]
    loaded = load_classifier(candidate.path)
    outputs = model_outputs(loaded, list(test["text"]), with_embeddings=True)
    predicted = outputs.logits.argmax(dim=1).numpy()
    is_oos = np.asarray(test["label"]) == oos
    assert np.mean(predicted[is_oos] == oos) >= 0.5, "the oos class was not learnt"  # trained like any other
    flagged, _ = detector.flags(outputs)
    assert flagged[predicted == oos].all()  # predicted as oos: flagged, whatever the score
    figures = evaluation.out_of_scope
    assert figures["out_of_scope_texts"] == is_oos.sum() and figures["in_scope_texts"] == (~is_oos).sum()
    assert figures["out_of_scope_recall/labelled"] == pytest.approx(flagged[is_oos].mean())
    in_scope_correct = (predicted == np.asarray(test["label"]))[~is_oos]
    assert figures["in_scope_accuracy"] == pytest.approx(in_scope_correct.mean())
    validation_labels = np.asarray(load_from_disk(dataset.path)["validation"]["label"])
    assert detector.calibration["validation_texts"] == np.sum(validation_labels != oos)
    assert "validation_out_of_scope_recall" in detector.calibration
