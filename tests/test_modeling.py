"""The model format: safetensors only, exact reloads, compression re-applied at load time."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from domainflow.modeling import TextClassifier, load_classifier, load_encoder, predict_proba, save_classifier
from domainflow.records import ModelRef
from tasks.compress import compress_model

TEXTS = ["I still have not received my card", "what is the exchange rate today?", "my pin is blocked", "hi"]


@pytest.fixture(scope="module")
def saved_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    encoder, tokenizer = load_encoder(str(tiny_model_dir))
    model = TextClassifier(encoder, num_labels=3)
    out = tmp_path_factory.mktemp("model")
    save_classifier(model, tokenizer, out, label_names=["a", "b", "c"], max_length=32)
    return out


def test_reload_predicts_identically(saved_model: Path) -> None:
    first = predict_proba(load_classifier(saved_model), TEXTS)
    second = predict_proba(load_classifier(saved_model), TEXTS)
    assert torch.equal(first, second)
    assert torch.allclose(first.sum(dim=1), torch.ones(len(TEXTS)))
    config = json.loads((saved_model / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}


def test_batching_and_order_do_not_change_predictions(saved_model: Path) -> None:
    loaded = load_classifier(saved_model)
    batched = predict_proba(loaded, TEXTS, batch_size=4)
    single = torch.cat([predict_proba(loaded, [t], batch_size=1) for t in TEXTS])
    assert torch.allclose(batched, single, atol=1e-5)


def test_no_pickles_are_written(saved_model: Path) -> None:
    for path in saved_model.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"\x80\x02", f"{path.name} looks like a pickle"
            assert not zipfile.is_zipfile(path), f"{path.name} is a zip (torch.save) archive"


def test_int8_candidate_reloads_identically_and_is_quantized(saved_model: Path, tmp_path: Path) -> None:
    parent = ModelRef(name="finetuned", path=str(saved_model), fingerprint="x")
    child = compress_model(parent, "dynamic_int8", tmp_path / "int8")
    assert child.compression == "dynamic_int8" and child.parent == "finetuned" and child.name == "finetuned-int8"
    first, second = load_classifier(child.path), load_classifier(child.path)
    assert any(
        type(m).__name__ == "Linear" and m.__module__.startswith("torch.ao.nn.quantized") for m in first.model.modules()
    )
    assert torch.equal(predict_proba(first, TEXTS), predict_proba(second, TEXTS))
    fp32 = predict_proba(load_classifier(saved_model), TEXTS)
    int8 = predict_proba(first, TEXTS)
    assert not torch.equal(fp32, int8)  # quantization changed the arithmetic …
    assert torch.equal(fp32.argmax(dim=1), int8.argmax(dim=1))  # … but not the answers
    assert torch.allclose(fp32, int8, atol=0.1)


def test_unknown_recipe_and_double_compression_are_refused(saved_model: Path, tmp_path: Path) -> None:
    parent = ModelRef(name="finetuned", path=str(saved_model), fingerprint="x")
    with pytest.raises(ValueError, match="unknown compression recipe"):
        compress_model(parent, "magic", tmp_path / "x")
    child = compress_model(parent, "dynamic_int8", tmp_path / "int8")
    with pytest.raises(ValueError, match="already quantized"):
        compress_model(child, "dynamic_int8", tmp_path / "y")


def test_loading_a_folder_that_is_not_a_model_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="domainflow.json"):
        load_classifier(tmp_path)
