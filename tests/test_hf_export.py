"""Models other tools load: an fp32 classifier folder is a Hugging Face model after ``import domainflow``.

What is proven here, with real MiniLM weights and real transformers code (nothing mocked):
transformers' own ``pipeline("text-classification", model=folder)`` answers 200 real Banking77
texts with the labels and probabilities domainflow computes; it needs no ``trust_remote_code``
(the model type is registered by ``import domainflow``, lazily, and without it transformers
refuses the folder); compressed candidates and folders of the old format are refused with a
message that says why; and the model cards the pipeline's report step writes open with Hub
metadata carrying each candidate's test results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from domainflow.catalog import get_domain
from domainflow.hf_export import ARCHITECTURE, MODEL_TYPE, encoder_config_of, export_for_transformers
from domainflow.hf_pipeline import MeanPoolForSequenceClassification
from domainflow.modeling import load_classifier, predict_proba, read_metadata, resolve_base_model, write_metadata
from domainflow.records import DatasetRef, Evaluation, ModelRef
from tasks.compress import quantize_model
from tasks.evaluate import evaluate_candidate
from tasks.finetune import make_train_config, train_linear_probe
from tasks.report import DEFAULT_BASE_MODEL_ID, hub_base_model, write_report
from tests.data_helpers import banking77_rows
from tests.process_helpers import clean_env

TOLERANCE = 1e-4  # probabilities: the pipeline pads and batches its own way, so float sums differ in the last bits


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """200 real Banking77 test texts, every 15th row: all 77 intents, short and long ones."""
    return [row["text"].strip() for row in banking77_rows("test")[::15]][:200]


@pytest.fixture(scope="module")
def dataset(tiny_dataset: DatasetRef) -> DatasetRef:
    return tiny_dataset


@pytest.fixture(scope="module")
def probe(
    tiny_domain: str, tiny_model_dir: Path, dataset: DatasetRef, tmp_path_factory: pytest.TempPathFactory
) -> ModelRef:
    """A real classifier of six intents (two-layer MiniLM + logistic-regression head), saved by domainflow."""
    config = make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=7)
    return train_linear_probe(dataset, config, tmp_path_factory.mktemp("probe") / "linear_probe")


def pipeline_probabilities(pipe: Any, texts: list[str], labels: list[str], max_length: int) -> torch.Tensor:
    """Every label's probability per text, as transformers' pipeline returns them, in our label order."""
    answers = pipe(texts, batch_size=16, top_k=None, truncation=True, max_length=max_length)
    return torch.tensor([[{a["label"]: a["score"] for a in answer}[label] for label in labels] for answer in answers])


def assert_same_answers(folder: str | Path, texts: list[str]) -> torch.Tensor:
    """transformers' pipeline on ``folder`` gives domainflow's labels and probabilities; returns ours."""
    from transformers import pipeline

    loaded = load_classifier(folder)
    ours = predict_proba(loaded, texts)
    pipe = pipeline("text-classification", model=str(folder), trust_remote_code=False, device="cpu")
    assert type(pipe.model) is MeanPoolForSequenceClassification
    theirs = pipeline_probabilities(pipe, texts, loaded.label_names, loaded.max_length)
    assert theirs.argmax(dim=1).tolist() == ours.argmax(dim=1).tolist()
    assert float((theirs - ours).abs().max()) < TOLERANCE
    return ours


def front_matter(card: str) -> dict[str, Any]:
    """The YAML between the card's opening ``---`` lines (the Hub's model card metadata)."""
    assert card.startswith("---\n"), card[:200]
    head, _, _ = card[len("---\n") :].partition("\n---\n")
    parsed = yaml.safe_load(head)
    assert isinstance(parsed, dict)
    return parsed


def index_metrics(meta: dict[str, Any]) -> dict[str, float]:
    """model-index metrics of the card's single result, by name."""
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification" and result["dataset"]["split"] == "test"
    return {metric["name"]: metric["value"] for metric in result["metrics"]}


# ------------------------------------------------------------------- one format, two readers


def test_a_saved_folder_is_a_transformers_model_that_answers_as_domainflow(probe: ModelRef, texts: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    folder = Path(probe.path)
    labels = read_metadata(folder)["label_names"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["architectures"] == [ARCHITECTURE]
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}
    assert config["num_hidden_layers"] == 2  # the encoder's fields stay flat: readers of config.json keep working
    assert "auto_map" not in config and not list(folder.glob("*.py"))  # nothing for trust_remote_code to run
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(model) is MeanPoolForSequenceClassification
    ours = load_classifier(folder).torch_model.state_dict()
    theirs = model.state_dict()
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[key], ours[key]) for key in ours)

    probabilities = assert_same_answers(folder, texts)
    assert len(set(probabilities.argmax(dim=1).tolist())) >= 3  # real, varied answers, not one constant label


FRESH_PROCESS = """
import json, sys
import domainflow
light = not any(name in sys.modules for name in ("torch", "transformers"))
from transformers import pipeline
pipe = pipeline("text-classification", model=sys.argv[1], trust_remote_code=False, device="cpu")
answers = pipe(json.loads(sys.argv[2]), truncation=True, max_length=64)
print(json.dumps({"light": light, "labels": [a["label"] for a in answers]}))
"""

TRANSFORMERS_FIRST = """
import json, sys
from transformers import AutoModelForSequenceClassification
try:
    AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
    before = "loaded"
except ValueError as error:
    before = str(error)
import domainflow
after = type(AutoModelForSequenceClassification.from_pretrained(sys.argv[1])).__name__
print(json.dumps({"before": before, "after": after}))
"""


def _python_in_parallel(scripts: list[tuple[str, list[str]]], home: Path) -> list[dict[str, Any]]:
    """Run each (code, argv) in a fresh interpreter, side by side (each spends its time importing torch and
    transformers); the JSON each prints last."""
    env = clean_env(home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for code, args in scripts
    ]
    results = []
    for process in processes:
        out, err = process.communicate()
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_import_domainflow_is_all_a_fresh_process_needs_and_stays_light(
    probe: ModelRef, texts: list[str], tmp_path: Path
) -> None:
    """The registration happens when transformers is imported, in either order; without it transformers refuses."""
    loaded = load_classifier(probe.path)
    expected = [loaded.label_names[i] for i in predict_proba(loaded, texts[:20]).argmax(dim=1).tolist()]
    fresh, late = _python_in_parallel(
        [(FRESH_PROCESS, [probe.path, json.dumps(texts[:20])]), (TRANSFORMERS_FIRST, [probe.path])], home=tmp_path
    )
    assert fresh == {"light": True, "labels": expected}
    assert MODEL_TYPE in late["before"]  # unregistered, transformers does not know the folder's model type …
    assert late["after"] == ARCHITECTURE  # … and `import domainflow` registers it even after transformers loaded


# ------------------------------------------------------------------- what transformers must not load


def test_a_torch_int8_candidate_is_refused_with_the_reason(probe: ModelRef, tmp_path: Path) -> None:
    """Its safetensors are its parent's fp32 weights: loading them as the int8 model would be a silent swap.
    (The ONNX int8 refusal is checked on the pipeline run's own ONNX candidate, below.)"""
    from transformers import AutoModelForSequenceClassification, pipeline

    int8 = quantize_model(probe, tmp_path / "int8", "dynamic_int8")
    reason = "is a dynamic_int8 candidate.*a different model from the one evaluated"
    with pytest.raises(ValueError, match=reason):
        AutoModelForSequenceClassification.from_pretrained(int8.path)
    with pytest.raises(ValueError, match=reason):  # the pipeline passes the reason on
        pipeline("text-classification", model=int8.path, device="cpu")
    assert load_classifier(int8.path).metadata["compression"] == "dynamic_int8"  # domainflow still loads it


def test_a_folder_of_the_old_format_still_loads_and_exports_to_the_new(
    probe: ModelRef, texts: list[str], tmp_path: Path
) -> None:
    """Format 1 (models already in registries): config.json was the bare encoder's config."""
    old = tmp_path / "old"
    shutil.copytree(probe.path, old)
    encoder_config_of(old).save_pretrained(old)  # config.json as format 1 wrote it
    metadata = read_metadata(old)
    write_metadata(old, {**metadata, "format_version": 1})
    assert json.loads((old / "config.json").read_text())["model_type"] == "bert"

    assert torch.equal(predict_proba(load_classifier(old), texts), predict_proba(load_classifier(probe.path), texts))
    with pytest.raises(ValueError, match="export_for_transformers"):
        MeanPoolForSequenceClassification.from_pretrained(old)
    exported = export_for_transformers(old, tmp_path / "exported")
    assert read_metadata(exported)["format_version"] == 2
    assert_same_answers(exported, texts[:40])


# ------------------------------------------------------------------- the pipeline's own folders and cards


@pytest.fixture(scope="module")
def reported(
    tiny_domain: str, probe: ModelRef, dataset: DatasetRef, tmp_path_factory: pytest.TempPathFactory
) -> list[Evaluation]:
    """The pipeline's own steps, without Prefect and the speed step (a whole ``domain_pipeline`` run took 67-99 s
    here): an ONNX int8 child of the probe, the evaluate step on both, and the report step's model cards."""
    root = tmp_path_factory.mktemp("reported")
    onnx = quantize_model(probe, root / "onnx", "onnx_int8")
    measured = get_domain(tiny_domain).evaluation_slice()
    evaluations = [evaluate_candidate(c, dataset, measured, root / "reports" / c.name) for c in (probe, onnx)]
    write_report(evaluations, dataset, get_domain(tiny_domain))
    return evaluations


def test_an_onnx_int8_candidate_is_refused_with_the_reason(reported: list[Evaluation]) -> None:
    from transformers import AutoModelForSequenceClassification, pipeline

    folder = reported[1].candidate.path
    reason = "is an ONNX int8 candidate.*not weights transformers can load"
    with pytest.raises(ValueError, match=reason):
        AutoModelForSequenceClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match=reason):  # the pipeline passes the reason on
        pipeline("text-classification", model=folder, device="cpu")
    assert load_classifier(folder).metadata["compression"] == "onnx_int8"  # domainflow still loads it


def test_model_cards_open_with_hub_metadata_and_their_candidates_test_results(reported: list[Evaluation]) -> None:
    libraries = {}
    for evaluation in reported:
        card = (Path(evaluation.report_dir) / "model_card.md").read_text()
        meta = front_matter(card)
        libraries[evaluation.candidate.name] = meta["library_name"]
        assert meta["pipeline_tag"] == "text-classification"
        assert meta["datasets"] == ["PolyAI/banking77"]  # the domain's Hub data set (Banking77)
        assert "base_model" not in meta  # a local folder (the cut-down test model) has no Hub id
        written = json.loads((Path(evaluation.report_dir) / "metrics.json").read_text())["test"]
        assert index_metrics(meta) == {
            "Accuracy": round(written["accuracy"], 4),
            "Macro F1": round(written["macro_f1"], 4),
        }
        assert written == evaluation.test_metrics and written["accuracy"] > 0.5  # a real model's real results
        assert "\n# cs_tiny — " in card  # the card itself follows its front matter
    assert libraries == {"linear_probe": "transformers", "linear_probe-onnx-int8": "onnx"}
    assert hub_base_model(resolve_base_model(None)) == DEFAULT_BASE_MODEL_ID  # what a default run's card names
