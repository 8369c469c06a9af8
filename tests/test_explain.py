"""Word attributions (domainflow/explain.py) on a real six-intent classifier (two-layer MiniLM + logistic regression)
and on its ONNX int8 copy, through the library, the service over real HTTP and the CLI.

What must hold: an occlusion score *is* the measured log-odds drop of deleting that word (recomputed here from
separate predictions), from one model call; integrated gradients' word scores add up to the log-odds gained over
the baseline and point at words whose deletion hurts; the faithfulness arithmetic is what its docstring says; the
endpoint answers per-word scores aligned with the text, under the same key and validation as /predict, and says
why it cannot run integrated gradients on an int8 graph; the CLI's exit codes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from domainflow.explain import (
    ExplanationUnavailableError,
    beats_random,
    deletion_drops,
    explain_text,
    influential_words,
    integrated_gradients,
    log_odds,
    occlusion,
    split_words,
    without_words,
)
from domainflow.modeling import LoadedClassifier, load_classifier, predict_proba
from domainflow.records import ModelRef
from domainflow.registry import ModelRegistry
from serving import ApiKeys, ServingConfig, create_app
from tasks.compress import quantize_model
from tests.conftest import TINY_LABELS
from tests.process_helpers import ThreadedUvicorn

KEY = "explain-test-key-5c1d9e7a"
TEXT = "Hello, I think my card has been stolen yesterday"


def measured_log_odds(loaded: LoadedClassifier, texts: list[str], label: int, together: bool) -> list[float]:
    """log(p / (1 - p)) of ``label`` for each text, from predict_proba (not the explainer's code): one batch-1
    prediction per text, or all the texts as one batch (``together``)."""
    if together:
        probabilities = predict_proba(loaded, texts, batch_size=len(texts))[:, label].tolist()
    else:
        probabilities = [float(predict_proba(loaded, [text], batch_size=1)[0, label]) for text in texts]
    return [math.log(p / (1.0 - p)) for p in probabilities]


class CountingModel:
    """The real model, counting its forward calls and the rows of each."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, []

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: Any) -> Any:
        self.calls.append(int(input_ids.shape[0]))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)


@pytest.fixture(scope="module")
def fp32_dir(tiny_probe: ModelRef) -> Path:
    return Path(tiny_probe.path)


@pytest.fixture(scope="module")
def int8_dir(tiny_probe: ModelRef, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(quantize_model(tiny_probe, tmp_path_factory.mktemp("explain-onnx") / "candidate", "onnx_int8").path)


@pytest.fixture(scope="module")
def fp32(fp32_dir: Path) -> LoadedClassifier:
    return load_classifier(fp32_dir)


@pytest.fixture(scope="module")
def int8(int8_dir: Path) -> LoadedClassifier:
    return load_classifier(int8_dir)


# ------------------------------------------------------------------------------------------ words


def test_words_keep_contractions_and_numbers_whole_and_deletion_keeps_the_rest() -> None:
    text = "I can't top-up my card: 3.5 EUR, twice!"
    words = split_words(text)
    assert [w.text for w in words] == ["I", "can't", "top-up", "my", "card", "3.5", "EUR", "twice"]
    assert all(text[w.start : w.end] == w.text for w in words)
    assert without_words(text, [words[4]]) == "I can't top-up my : 3.5 EUR, twice!"
    assert without_words(text, [words[7], words[0]]) == "can't top-up my card: 3.5 EUR, !"
    assert split_words("?!  ...") == []


def test_log_odds_are_computed_from_the_logits_without_saturating() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [60.0, 0.0, 0.0]])
    p = torch.softmax(logits[0], dim=0)
    assert torch.allclose(log_odds(logits)[0], torch.log(p / (1 - p)), atol=1e-5)
    # p(label 0) is 1.0 in float32 here, yet its log-odds are finite: 60 - log(2)
    assert torch.softmax(logits[1], dim=0)[0] == 1.0
    assert log_odds(logits)[1, 0].item() == pytest.approx(60.0 - math.log(2.0), abs=1e-4)


# ------------------------------------------------------------------------------------------ occlusion


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_occlusion_scores_are_the_measured_log_odds_drops_from_one_model_call(
    which: str, request: pytest.FixtureRequest
) -> None:
    """fp32: against one batch-1 prediction per variant. int8: ONNX Runtime's dynamic quantization sets each
    activation's int8 range from the whole batch (padding included), so a text's probabilities move with its
    batch-mates (up to ~1 in log-odds on the customer_service champion): the recomputation batches the same
    texts together, and the prediction is compared with batch 1 loosely."""
    loaded: LoadedClassifier = request.getfixturevalue(which)
    counting = CountingModel(loaded.model)
    wrapped = LoadedClassifier(counting, loaded.tokenizer, loaded.label_names, loaded.max_length, loaded.metadata)
    other = "exchange_rate"
    explanation = occlusion(wrapped, TEXT, other_label=other)

    words = split_words(TEXT)
    assert counting.calls == [len(words) + 1]  # the text and each one-word deletion: one forward pass
    together = which == "int8"
    probabilities = predict_proba(loaded, [TEXT], batch_size=1)[0]
    predicted = int(probabilities.argmax())
    assert explanation.label == loaded.label_names[predicted]
    assert explanation.score == pytest.approx(float(probabilities[predicted]), abs=0.05 if together else 1e-4)
    assert explanation.words == words and len(explanation.scores) == len(words)
    assert explanation.other_label == other and explanation.other_scores is not None

    for target, scores in (
        (predicted, explanation.scores),
        (loaded.label_names.index(other), explanation.other_scores),
    ):
        variants = [without_words(TEXT, [w]) for w in words]
        base, *deleted = measured_log_odds(loaded, [TEXT, *variants], target, together)
        expected = [base - d for d in deleted]
        assert scores == pytest.approx(expected, abs=2e-3)
    assert max(abs(s) for s in explanation.scores) > 0.05  # the words do matter to this model


def test_words_past_the_models_length_score_zero_and_cost_no_row(fp32: LoadedClassifier) -> None:
    text = "my card has been stolen" + " and" * 80  # far past max_length (64 tokens), one token per word
    counting = CountingModel(fp32.model)
    wrapped = LoadedClassifier(counting, fp32.tokenizer, fp32.label_names, fp32.max_length, fp32.metadata)
    explanation = occlusion(wrapped, text)
    seen = fp32.max_length - 2  # [CLS] and [SEP]
    assert len(fp32.tokenizer(text)["input_ids"]) == len(explanation.words) + 2
    assert counting.calls == [seen + 1]
    assert all(score == 0.0 for score in explanation.scores[seen:])
    assert any(score != 0.0 for score in explanation.scores[:seen])


# ------------------------------------------------------------------------------------------ integrated gradients


def test_integrated_gradients_add_up_and_point_at_the_words_whose_deletion_hurts(fp32: LoadedClassifier) -> None:
    pytest.importorskip("captum")
    text = "my card has been stolen please block it"
    explanation = integrated_gradients(fp32, text, other_label="card_arrival", n_steps=64)
    predicted = fp32.label_names.index(explanation.label)
    # completeness: the word scores add up to the log-odds of the text minus those of the all-[PAD] baseline
    ids = fp32.tokenizer(text, return_tensors="pt")["input_ids"]
    baseline = torch.full_like(ids, fp32.tokenizer.pad_token_id)
    baseline[0, 0], baseline[0, -1] = ids[0, 0], ids[0, -1]
    with torch.no_grad():
        logits = fp32.torch_model(input_ids=torch.cat([ids, baseline]), attention_mask=torch.ones(2, ids.shape[1]))
    gained = log_odds(logits["logits"])[:, predicted]
    assert sum(explanation.scores) == pytest.approx(float(gained[0] - gained[1]), rel=0.05, abs=0.05)
    assert explanation.other_scores is not None and explanation.other_label == "card_arrival"
    assert explanation.other_scores != explanation.scores

    # deleting the top-scored word lowers the predicted probability more than deleting the lowest-scored one
    order = sorted(range(len(explanation.words)), key=lambda i: explanation.scores[i])
    top, bottom = explanation.words[order[-1]], explanation.words[order[0]]
    p = predict_proba(fp32, [text, without_words(text, [top]), without_words(text, [bottom])])[:, predicted]
    assert float(p[0] - p[1]) > float(p[0] - p[2])


def test_integrated_gradients_refuse_an_int8_graph_with_the_reason(int8: LoadedClassifier) -> None:
    with pytest.raises(ExplanationUnavailableError, match="ONNX Runtime graph.*occlusion"):
        explain_text(int8, TEXT, "integrated_gradients")
    with pytest.raises(ValueError, match="unknown label 'no_such_label'"):
        explain_text(int8, TEXT, "occlusion", "no_such_label")
    with pytest.raises(ValueError, match="empty"):
        explain_text(int8, "   ")
    with pytest.raises(ValueError, match="unknown explanation method 'shap'"):
        explain_text(int8, TEXT, "shap")


# ------------------------------------------------------------------------------------------ faithfulness, summary


def test_deletion_drops_and_the_offering_rule(fp32: LoadedClassifier) -> None:
    texts = [TEXT, "what is the exchange rate"]
    targets = [0, 2]
    drops = deletion_drops(fp32, texts, [[3, 5], [3]], targets, ks=(1, 2))
    words = [split_words(t) for t in texts]
    expected_variants = [
        [TEXT, without_words(TEXT, [words[0][3]]), without_words(TEXT, [words[0][3], words[0][5]])],
        [
            texts[1],
            without_words(texts[1], [words[1][3]]),
            without_words(texts[1], [words[1][3]]),
        ],  # ranked 1: k=2 deletes it
    ]
    for row, (variants, target) in enumerate(zip(expected_variants, targets, strict=True)):
        p = predict_proba(fp32, variants, batch_size=1)[:, target]
        assert drops[row] == pytest.approx([float(p[0] - p[1]), float(p[0] - p[2])], abs=1e-5)

    rng = np.random.default_rng(0)
    random_aopc = rng.normal(0.10, 0.05, size=300)
    assert beats_random(random_aopc + 0.05, random_aopc)
    assert not beats_random(random_aopc + rng.normal(0.0, 0.05, size=300), random_aopc)
    assert not beats_random(random_aopc - 0.05, random_aopc)


def test_influential_words_per_class_are_mean_drops_over_the_class(tiny_dataset, fp32: LoadedClassifier) -> None:
    from datasets import load_from_disk

    validation = load_from_disk(tiny_dataset.path)["validation"]
    texts, labels = list(validation["text"]), [int(i) for i in validation["label"]]
    capped = influential_words(fp32, texts, labels, per_class=1, top=3)
    assert [row["label"] for row in capped] == [fp32.label_names[i] for i in sorted(set(labels))]
    assert all(row["texts"] == 1 and 1 <= len(row["words"]) <= 3 for row in capped)

    summary = influential_words(fp32, texts, labels, per_class=100, top=3)  # every validation text of each class
    for row in summary:
        label = fp32.label_names.index(row["label"])
        members = [t for t, y in zip(texts, labels, strict=True) if y == label]
        assert row["texts"] == len(members)
        weights = [weight for _, weight in row["words"]]
        assert weights == sorted(weights, reverse=True) and all(w > 0 for w in weights)
        # recomputed: the word's log-odds drops for the class, text by text, summed and divided by the texts
        word, weight = row["words"][0]
        total = 0.0
        for text in members:
            explanation = occlusion(fp32, text, other_label=row["label"])
            assert explanation.other_scores is not None
            total += sum(
                s for w, s in zip(explanation.words, explanation.other_scores, strict=True) if w.text.lower() == word
            )
        assert weight == pytest.approx(total / len(members), abs=1e-3)


def test_the_report_explains_the_reference_candidate_in_every_card(
    tiny_domain: str, tiny_dataset, tiny_probe: ModelRef, int8_dir: Path, tmp_path: Path
) -> None:
    from domainflow.catalog import get_domain
    from domainflow.records import Evaluation
    from tasks.report import INFLUENTIAL_WORDS_FILE, write_influential_words

    def evaluation(ref: ModelRef, accuracy: float) -> Evaluation:
        figures = {"accuracy": accuracy}
        return Evaluation(
            candidate=ref, test_metrics=figures, validation_metrics=figures, size_bytes=1, disk_bytes=1,
            parameters=1, report_dir=str(tmp_path),
        )  # fmt: skip

    child = ModelRef(name="linear_probe-onnx-int8", path=str(int8_dir), fingerprint="c", parent="linear_probe",
                     compression="onnx_int8")  # fmt: skip
    # the compressed child scores higher, yet the reference (the best uncompressed candidate) is what is explained
    lines = write_influential_words(
        [evaluation(tiny_probe, 0.5), evaluation(child, 0.9)], tiny_dataset, get_domain(tiny_domain), tmp_path
    )
    written = json.loads((tmp_path / INFLUENTIAL_WORDS_FILE).read_text())
    assert written["candidate"] == tiny_probe.name and len(written["classes"]) == len(TINY_LABELS)
    assert lines[0] == "## Most influential words per class (validation)" and f"`{tiny_probe.name}`" in lines[1]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| label")]
    assert len(rows) == len(TINY_LABELS) and all(f"| {row['label']} |" in "\n".join(rows) for row in written["classes"])


# ------------------------------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def explain_server(tiny_domain: str, int8_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("explain-registry")
    registry = ModelRegistry(tiny_domain, root=root / tiny_domain)
    registry.promote(
        int8_dir,
        metrics={"test": {"accuracy": 0.5}},
        lineage={"candidate": "probe-onnx-int8"},
        decision={"summary": "test"},
    )
    config = ServingConfig(registry_root=root, domains=(tiny_domain,), max_texts=8, max_chars=300, poll_seconds=0.2)
    server = ThreadedUvicorn(create_app(config, api_keys=ApiKeys([KEY]))).start()
    yield server
    server.stop()


def test_explain_endpoint_over_http(explain_server: ThreadedUvicorn, tiny_domain: str, int8: LoadedClassifier) -> None:
    server = explain_server
    url = f"/v1/{tiny_domain}/explain"
    key = {"X-API-Key": KEY}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post(url, json={"text": TEXT}).status_code == 401
        assert (
            client.post(url, json={"text": TEXT}, headers={"X-API-Key": "wrong-key-but-long-enough"}).status_code == 401
        )

        answer = client.post(url, json={"text": TEXT, "label": "exchange_rate"}, headers=key)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        local = explain_text(int8, TEXT, "occlusion", "exchange_rate")
        assert (body["domain"], body["version"], body["method"]) == (tiny_domain, 1, "occlusion")
        assert body["label"] == local.label and body["score"] == pytest.approx(local.score, abs=1e-5)
        assert [w["word"] for w in body["words"]] == [w.text for w in split_words(TEXT)]
        assert all(TEXT[w["start"] : w["end"]] == w["word"] for w in body["words"])
        assert [w["score"] for w in body["words"]] == pytest.approx(local.scores, rel=1e-5, abs=1e-4)
        assert [w["other_score"] for w in body["words"]] == pytest.approx(local.other_scores, rel=1e-5, abs=1e-4)
        assert body["other_label"] == "exchange_rate"
        predicted = client.post(f"/v1/{tiny_domain}/predict", json={"texts": [TEXT]}, headers=key).json()
        assert predicted["predictions"][0]["label"] == body["label"]  # the same model's answer as /predict

        for bad, where in (
            ({"text": "   "}, "text"),
            ({}, "text"),
            ({"text": TEXT, "method": "shap"}, "method"),
            ({"text": TEXT, "texts": [TEXT]}, "texts"),
            ({"text": TEXT, "label": "no_such_label"}, "label"),
        ):
            refused = client.post(url, json=bad, headers=key)
            assert refused.status_code == 422, (bad, refused.text)
            assert where in refused.json()["message"], refused.json()
        assert client.post(url, json={"text": "x" * 301}, headers=key).status_code == 422
        assert client.post(url, content=b"{" + b" " * 40_000 + b"}", headers=key).status_code == 413
        assert client.post("/v1/no_such_domain/explain", json={"text": TEXT}, headers=key).status_code == 404

        refused = client.post(url, json={"text": TEXT, "method": "integrated_gradients"}, headers=key)
        assert refused.status_code == 409 and "occlusion" in refused.json()["detail"]


def test_explain_endpoint_runs_integrated_gradients_on_an_fp32_champion(
    tiny_domain: str, fp32_dir: Path, fp32: LoadedClassifier, tmp_path: Path
) -> None:
    pytest.importorskip("captum")
    registry = ModelRegistry(tiny_domain, root=tmp_path / tiny_domain)
    registry.promote(fp32_dir, metrics={"test": {"accuracy": 0.5}}, lineage={"candidate": "probe"}, decision={})
    server = ThreadedUvicorn(
        create_app(ServingConfig(registry_root=tmp_path, domains=(tiny_domain,)), api_keys=ApiKeys([KEY]))
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = {"text": TEXT, "method": "integrated_gradients", "label": "card_arrival"}
            answer = client.post(f"/v1/{tiny_domain}/explain", json=body, headers={"X-API-Key": KEY})
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    got = answer.json()
    local = integrated_gradients(fp32, TEXT, other_label="card_arrival")
    assert (got["version"], got["method"], got["label"]) == (1, "integrated_gradients", local.label)
    assert [w["score"] for w in got["words"]] == pytest.approx(local.scores, abs=1e-3)
    assert [w["other_score"] for w in got["words"]] == pytest.approx(local.other_scores, abs=1e-3)


# ------------------------------------------------------------------------------------------ the CLI


def test_cli_explain_exit_codes(
    tiny_domain: str, int8_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import app

    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path))
    runner = CliRunner()
    none_yet = runner.invoke(app, ["explain", tiny_domain, TEXT])
    assert none_yet.exit_code == 2 and "no champion" in none_yet.output

    ModelRegistry(tiny_domain).promote(
        int8_dir,
        metrics={"test": {"accuracy": 0.5}},
        lineage={"candidate": "probe-onnx-int8"},
        decision={"summary": "test"},
    )
    shown = runner.invoke(app, ["explain", tiny_domain, TEXT, "--label", "exchange_rate"])
    assert shown.exit_code == 0, shown.output
    assert "exchange_rate" in shown.output and "stolen" in shown.output
    as_json = runner.invoke(app, ["explain", tiny_domain, TEXT, "--json"])
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.stdout)
    assert body["version"] == 1 and [w["word"] for w in body["words"]] == [w.text for w in split_words(TEXT)]
    assert body["label"] in TINY_LABELS

    for args, message in (
        (["--method", "integrated_gradients"], "occlusion"),
        (["--label", "no_such_label"], "unknown label"),
        (["--method", "shap"], "unknown explanation method"),
    ):
        refused = runner.invoke(app, ["explain", tiny_domain, TEXT, *args])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert runner.invoke(app, ["explain", tiny_domain, "   "]).exit_code == 2
