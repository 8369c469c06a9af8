"""Fine-tuning in two processes with torch DDP (gloo, under torchrun) against one process, same recipe and seed.

Real processes: ``torchrun`` starts two ranks that all-reduce their gradients; rank 0 saves the model. What
must hold: the distributed run trains (its loss falls, its accuracy is the single process's within a tolerance
a slice can resolve), it saved one complete model, and a rank's failure fails the call instead of leaving a
half-written folder that looks finished.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from domainflow.catalog import get_domain
from domainflow.metrics import compute_metrics
from domainflow.modeling import load_classifier, predict_proba
from domainflow.records import DatasetRef, ModelRef
from tasks.finetune import TrainConfig, finetune_classifier, make_train_config, train_linear_probe


@pytest.fixture(scope="module")
def dataset(tiny_dataset: DatasetRef) -> DatasetRef:
    return tiny_dataset


def _config(tiny_domain: str, tiny_model_dir: Path, processes: int) -> TrainConfig:
    return make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=7, processes=processes)


@pytest.fixture(scope="module")
def probe(dataset: DatasetRef, tiny_domain: str, tiny_model_dir: Path, tmp_path_factory) -> ModelRef:
    return train_linear_probe(dataset, _config(tiny_domain, tiny_model_dir, 1), tmp_path_factory.mktemp("p") / "probe")


def _test_accuracy(model: ModelRef, dataset: DatasetRef) -> float:
    from datasets import load_from_disk

    test = load_from_disk(dataset.path)["test"]
    predicted = predict_proba(load_classifier(model.path), list(test["text"])).argmax(dim=1).numpy()
    return compute_metrics(["accuracy"], predicted, test["label"])["accuracy"]


def test_two_ddp_processes_train_like_one(
    dataset: DatasetRef, probe: ModelRef, tiny_domain: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    single = finetune_classifier(dataset, Path(probe.path), _config(tiny_domain, tiny_model_dir, 1), tmp_path / "one")
    double = finetune_classifier(dataset, Path(probe.path), _config(tiny_domain, tiny_model_dir, 2), tmp_path / "two")
    one, two = _test_accuracy(single, dataset), _test_accuracy(double, dataset)
    print(f"test accuracy: 1 process {one:.4f}, 2 DDP processes {two:.4f}")
    assert one >= 0.8 and two >= 0.8  # chance: 1/6
    assert abs(one - two) <= 0.05  # a slice of 72 texts: 0.05 is 3-4 texts
    # Both trained the encoder from the probe, by comparable amounts (all-reduced gradients, same global batch).
    start = load_classifier(probe.path).torch_model.state_dict()
    moved = {
        name: sum(
            float((weights[key] - start[key]).abs().sum())
            for key in start
            if key.startswith("encoder.") and start[key].is_floating_point()
        )
        for name, weights in (
            ("one", load_classifier(single.path).torch_model.state_dict()),
            ("two", load_classifier(double.path).torch_model.state_dict()),
        )
    }
    assert moved["one"] > 0 and moved["two"] > 0, moved
    assert 0.5 < moved["two"] / moved["one"] < 2.0, moved
    assert load_classifier(double.path).metadata["candidate"] == "finetuned"
    assert not list(tmp_path.glob("two.checkpoints")), "rank 0 removes the checkpoints once the model is saved"
