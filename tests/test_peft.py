"""Parameter-efficient candidates (LoRA, IA3) on the tiny two-layer MiniLM: what trains, what is stored, how it
loads, and that an int8 copy of a LoRA candidate still predicts like it."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from domainflow.catalog import get_domain
from domainflow.footprint import FOOTPRINT_KEY
from domainflow.modeling import (
    load_classifier,
    predict_logits,
    read_metadata,
    write_metadata,
)
from domainflow.peft_models import (
    ADAPTER_KEY,
    MERGED_KEY,
    AdapterError,
    AdapterMethod,
    adapter_methods,
    encoder_fingerprint,
    save_adapter_classifier,
)
from domainflow.records import ModelRef
from domainflow.spec import PeftSettings
from tasks.finetune import fit_classifier, make_train_config
from tasks.peft_train import train_adapter

pytest.importorskip("peft")

# Learning rates well above the domain defaults: one epoch on ~130 texts must move the adapter visibly.
LORA = AdapterMethod(
    kind="lora", learning_rate=2e-2, epochs=1.0, rank=4, alpha=8, dropout=0.0, target_modules=("query", "value")
)
IA3 = AdapterMethod(
    kind="ia3",
    learning_rate=5e-2,
    epochs=1.0,
    target_modules=("key", "value", "output.dense"),
    feedforward_modules=("output.dense",),
)


@pytest.fixture(scope="module")
def config(tiny_domain: str, tiny_model_dir: Path):
    return make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=7)


@pytest.fixture(scope="module")
def texts(tiny_dataset) -> list[str]:
    from datasets import load_from_disk

    return list(load_from_disk(tiny_dataset.path)["test"]["text"])


@pytest.fixture(scope="module")
def lora_fit(tiny_dataset, tiny_probe: ModelRef, config, tmp_path_factory: pytest.TempPathFactory):
    """LoRA trained in memory (not saved), with the probe's encoder fingerprint taken before."""
    before = encoder_fingerprint(load_classifier(tiny_probe.path).torch_model.encoder)
    work = tmp_path_factory.mktemp("lora-fit")
    fitted = fit_classifier(
        tiny_dataset, Path(tiny_probe.path), config, work / "lora", work / "checkpoints", name="lora", epochs=1.0,
        adapter=LORA,
    )  # fmt: skip
    return fitted, before


@pytest.fixture(scope="module")
def lora_ref(tiny_dataset, tiny_probe: ModelRef, config, tmp_path_factory: pytest.TempPathFactory) -> ModelRef:
    """A LoRA candidate folder, trained and saved as the pipeline's task does."""
    return train_adapter(tiny_dataset, Path(tiny_probe.path), config, LORA, tmp_path_factory.mktemp("lora") / "lora")


def test_lora_trains_only_the_adapter_and_the_head(lora_fit, tiny_probe: ModelRef) -> None:
    fitted, before = lora_fit
    model = fitted.model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("classifier.") for name in trainable), trainable
    assert {"classifier.weight", "classifier.bias"} <= set(trainable)
    # the base weights under the adapter are bit for bit those of the probe's encoder
    assert encoder_fingerprint(model.encoder) == before == fitted.base.fingerprint
    # ... while the adapter and the head did move: lora_B starts at zero, the head at the probe's solution
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(float(p.detach().abs().max()) > 1e-4 for p in lora_b)
    probe_head = load_classifier(tiny_probe.path).torch_model.classifier.weight
    assert not torch.allclose(model.classifier.weight, probe_head)
    # the fingerprint does see weight changes: a merged copy's differs from the base's (merging works in place)
    assert encoder_fingerprint(copy.deepcopy(model.encoder).merge_and_unload()) != before


def test_saved_lora_predicts_like_the_trained_model(lora_fit, tiny_dataset, config, texts, tmp_path: Path) -> None:
    fitted, _ = lora_fit
    model = fitted.model
    with torch.inference_mode():
        batch = fitted.tokenizer(
            texts, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt"
        )
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    out = save_adapter_classifier(
        model, fitted.tokenizer, tmp_path / "lora", label_names=tiny_dataset.label_names,
        max_length=config.max_length, method=LORA, base=fitted.base,
    )  # fmt: skip
    assert not (out / "model.safetensors").exists()  # no copy of the base weights
    loaded = load_classifier(out, merge_adapter=False)
    torch.testing.assert_close(predict_logits(loaded, texts), trained, atol=1e-4, rtol=1e-4)


def test_lora_folder_holds_adapter_head_and_base_fingerprint(
    lora_ref: ModelRef, tiny_model_dir: Path, tiny_dataset
) -> None:
    folder = Path(lora_ref.path)
    entry = read_metadata(folder)[ADAPTER_KEY]
    assert entry["kind"] == "lora" and entry["base"]["path"] == str(tiny_model_dir)
    base_encoder = load_classifier(folder, merge_adapter=False).torch_model.encoder
    assert entry["base"]["fingerprint"] == encoder_fingerprint(base_encoder)
    adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in key or "lora_B" in key for key in adapter)
    assert set(load_file(str(folder / "head.safetensors"))) == {"weight", "bias"}
    on_disk = (
        sum(p.stat().st_size for p in (folder / "adapter").iterdir()) + (folder / "head.safetensors").stat().st_size
    )
    assert entry["adapter_bytes"] == on_disk
    # rank 4 on query and value of 2 layers of width 384: 2 * 2 * (384*4 + 4*384), plus the head
    labels = len(tiny_dataset.label_names)  # the domain's 77 intents (six of them in the tiny data)
    footprint = read_metadata(folder)[FOOTPRINT_KEY]
    assert footprint["trainable_parameters"] == 2 * 2 * (2 * 384 * 4) + labels * 384 + labels
    assert footprint["peak_rss_mb"] > 0 and footprint["seconds"] > 0
    assert lora_ref.train_seconds > 0


def test_merged_lora_predicts_as_the_unmerged_one(lora_ref: ModelRef, tiny_probe: ModelRef, texts) -> None:
    unmerged = load_classifier(lora_ref.path, merge_adapter=False)
    merged = load_classifier(lora_ref.path)  # the default: adapter merged into the base weights
    assert any("lora_" in name for name, _ in unmerged.torch_model.named_parameters())
    assert not any("lora_" in name for name, _ in merged.torch_model.named_parameters())
    assert type(merged.torch_model.encoder).__name__ == "BertModel"
    unmerged_logits, merged_logits = predict_logits(unmerged, texts), predict_logits(merged, texts)
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-4, rtol=1e-4)
    # ... and the adapter is not a no-op: both differ from the probe they started from
    probe_logits = predict_logits(load_classifier(tiny_probe.path), texts)
    assert float((merged_logits - probe_logits).abs().max()) > 1e-2


def test_ia3_trains_and_loads(tiny_dataset, tiny_probe: ModelRef, config, texts, tmp_path: Path) -> None:
    ref = train_adapter(tiny_dataset, Path(tiny_probe.path), config, IA3, tmp_path / "ia3")
    metadata = read_metadata(ref.path)
    assert ref.name == "ia3" and metadata[ADAPTER_KEY]["kind"] == "ia3"
    unmerged = load_classifier(ref.path, merge_adapter=False)
    scales = [p for name, p in unmerged.torch_model.named_parameters() if "ia3_" in name]
    assert scales and any(float((p - 1.0).abs().max()) > 1e-4 for p in scales)  # IA3 starts at 1 and moved
    # keys and values of 2 layers (384 each) + the inputs of both feed-forward outputs, plus the head
    attention_output_in, ffn_out_in = 384, 1536  # 'output.dense' matches attention.output.dense too
    labels = len(tiny_dataset.label_names)
    expected = 2 * (384 + 384 + attention_output_in + ffn_out_in) + labels * 384 + labels
    assert metadata[FOOTPRINT_KEY]["trainable_parameters"] == expected
    merged_logits = predict_logits(load_classifier(ref.path), texts)
    torch.testing.assert_close(merged_logits, predict_logits(unmerged, texts), atol=1e-4, rtol=1e-4)
    from datasets import load_from_disk

    references = torch.tensor(load_from_disk(tiny_dataset.path)["test"]["label"])
    accuracy = float((merged_logits.argmax(dim=1) == references).float().mean())
    assert accuracy > 0.5  # six intents in the data: chance is 0.17


def test_a_folder_whose_base_changed_is_refused(lora_ref: ModelRef, tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in weights if k.endswith("attention.self.query.weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    folder = tmp_path / "lora"
    shutil.copytree(lora_ref.path, folder)
    metadata = read_metadata(folder)
    recorded = metadata[ADAPTER_KEY]["base"]["fingerprint"]
    metadata[ADAPTER_KEY]["base"]["path"] = str(base)
    write_metadata(folder, metadata)
    with pytest.raises(AdapterError) as refused:
        load_classifier(folder)
    message = str(refused.value)
    assert str(base) in message and recorded in message
    found = message.split("now has fingerprint ")[1].split(";")[0]
    assert len(found) == 16 and found != recorded

    metadata[ADAPTER_KEY]["base"]["path"] = str(tmp_path / "gone")
    write_metadata(folder, metadata)
    with pytest.raises(AdapterError, match="does not exist"):
        load_classifier(folder)


@pytest.mark.parametrize("recipe", ["onnx_int8", "dynamic_int8"])
def test_int8_copy_of_a_lora_candidate_predicts_close_to_it(
    lora_ref: ModelRef, tiny_probe: ModelRef, texts, tmp_path: Path, recipe: str
) -> None:
    from tasks.compress import quantize_model

    if recipe == "onnx_int8":
        pytest.importorskip("onnxruntime")
    int8 = quantize_model(lora_ref, tmp_path / "int8", recipe)
    metadata = read_metadata(int8.path)
    assert ADAPTER_KEY not in metadata and metadata[MERGED_KEY]["kind"] == "lora"  # stands alone, merged
    assert not (Path(int8.path) / "adapter").exists() and int8.parent == "lora"
    fp32 = torch.softmax(predict_logits(load_classifier(lora_ref.path), texts), dim=-1)
    quantized = torch.softmax(predict_logits(load_classifier(int8.path), texts), dim=-1)
    probe = torch.softmax(predict_logits(load_classifier(tiny_probe.path), texts), dim=-1)
    agreement = float((fp32.argmax(dim=1) == quantized.argmax(dim=1)).float().mean())
    assert agreement >= 0.9, agreement
    # close to the LoRA model, and closer to it than to the probe (what an int8 copy without the adapter would be)
    to_lora = float((quantized - fp32).abs().sum(dim=1).mean())
    to_probe = float((quantized - probe).abs().sum(dim=1).mean())
    assert to_lora < 0.1 and to_lora < to_probe, (to_lora, to_probe)


def test_evaluation_reports_what_training_cost(lora_ref: ModelRef, tiny_dataset, tiny_domain: str, tmp_path) -> None:
    from tasks.evaluate import evaluate_candidate

    evaluation = evaluate_candidate(lora_ref, tiny_dataset, get_domain(tiny_domain).evaluation_slice(), tmp_path)
    metadata = read_metadata(lora_ref.path)
    assert evaluation.training["trainable_parameters"] == metadata[FOOTPRINT_KEY]["trainable_parameters"]
    assert evaluation.training["adapter_bytes"] == metadata[ADAPTER_KEY]["adapter_bytes"]
    assert evaluation.training["peak_rss_mb"] > 0
    assert evaluation.parameters > 10 * evaluation.training["trainable_parameters"]  # the whole model is counted
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["training"] == evaluation.training


def test_peft_settings_become_methods_and_reject_contradictions() -> None:
    settings = PeftSettings(methods=("ia3", "lora"), lora_rank=16, epochs=2.0)
    methods = adapter_methods(settings)
    assert [m.kind for m in methods] == ["ia3", "lora"]
    assert methods[1].rank == 16 and methods[1].learning_rate == settings.lora_lr and methods[0].epochs == 2.0
    with pytest.raises(ValueError, match="listed twice"):
        PeftSettings(methods=("lora", "lora"))
    with pytest.raises(ValueError, match="not among ia3_target_modules"):
        PeftSettings(ia3_target_modules=("key",), ia3_feedforward_modules=("output.dense",))
    with pytest.raises(ValueError):
        PeftSettings(methods=("prefix",))
    # off unless a domain asks; customer_service measured them and ships without (see its domain file)
    assert [get_domain(name).peft.methods for name in ("customer_service", "finance_sentiment")] == [(), ()]


def test_transformers_refuses_an_adapter_folder_and_loads_its_merged_export(
    lora_ref: ModelRef, texts, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    from domainflow.hf_export import check_transformers_loadable, export_for_transformers

    with pytest.raises(ValueError, match="parameter-efficient candidate.*lora adapter"):
        check_transformers_loadable(lora_ref.path)
    exported = export_for_transformers(lora_ref.path, tmp_path / "exported")
    assert ADAPTER_KEY not in read_metadata(exported) and (exported / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    loaded = load_classifier(lora_ref.path)
    batch = loaded.tokenizer(texts[:8], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, predict_logits(loaded, texts[:8]), atol=1e-4, rtol=1e-4)


def test_lora_trains_in_two_ddp_processes(
    tiny_dataset, tiny_probe: ModelRef, tiny_domain: str, tiny_model_dir: Path, texts, tmp_path: Path
) -> None:
    """The adapter travels to the torchrun ranks (as JSON) and rank 0 saves an adapter folder."""
    config = make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=7, processes=2)
    ref = train_adapter(tiny_dataset, Path(tiny_probe.path), config, LORA, tmp_path / "lora")
    assert read_metadata(ref.path)[ADAPTER_KEY]["method"] == LORA.model_dump(mode="json")
    merged = predict_logits(load_classifier(ref.path), texts)
    probe = predict_logits(load_classifier(tiny_probe.path), texts)
    assert float((merged - probe).abs().max()) > 1e-2  # it trained


def test_a_lora_reference_can_be_pruned(lora_ref: ModelRef, tmp_path: Path) -> None:
    """The compressions that rewrite weights start from the merged model, and their folders stand alone."""
    from tasks.compress import magnitude_prune_model

    pruned = magnitude_prune_model(lora_ref, tmp_path / "sparse", 0.5)
    metadata = read_metadata(pruned.path)
    assert ADAPTER_KEY not in metadata and MERGED_KEY in metadata
    assert metadata["compression_details"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    merged = load_classifier(lora_ref.path).torch_model.state_dict()
    sparse = load_classifier(pruned.path).torch_model.state_dict()
    assert torch.equal(sparse["classifier.weight"], merged["classifier.weight"])  # the head is the LoRA model's
