"""Ensembles and cascades (domainflow/fusion.py) on real classifiers: the tiny probe (two-layer MiniLM) and a
second, different classifier (a one-layer MiniLM probe with a weaker regularisation), both trained here on real
Banking77 texts. What must hold: fused folders load and answer through the same ``load_classifier`` /
``predict_proba`` as any model; an ensemble is exactly the weighted mean of its members' probabilities; a cascade
answers each text with the fast model's or the strong model's probabilities by the rule and counts what it passed
on; the calibration picks the lowest threshold within the margin, computed here independently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from domainflow.catalog import get_domain
from domainflow.fusion import (
    CASCADE,
    ENSEMBLE,
    CascadeClassifier,
    FusionError,
    calibrate_threshold,
    cascade_curve,
    cascade_texts_per_second,
    fit_weights,
    write_fused,
)
from domainflow.modeling import count_parameters, load_classifier, predict_proba, read_metadata, write_metadata
from domainflow.records import DatasetRef, ModelRef
from tasks.finetune import make_train_config, train_linear_probe
from tests.conftest import TINY_LABELS


@pytest.fixture(scope="module")
def other(
    tiny_domain: str, tiny_model_dir: Path, tiny_dataset: DatasetRef, tmp_path_factory: pytest.TempPathFactory
) -> ModelRef:
    """A second real classifier that disagrees with the tiny probe on some texts: one encoder layer, C=20."""
    config = make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=3, num_layers=1)
    config = config.model_copy(update={"probe_c": 20.0})
    return train_linear_probe(tiny_dataset, config, tmp_path_factory.mktemp("other") / "linear_probe")


@pytest.fixture(scope="module")
def texts(tiny_dataset: DatasetRef) -> list[str]:
    from datasets import load_from_disk

    splits = load_from_disk(tiny_dataset.path)
    return [*splits["test"]["text"], *splits["validation"]["text"]]


def _probabilities(folder: str | Path, texts: list[str]) -> torch.Tensor:
    return predict_proba(load_classifier(folder), texts)


def test_an_ensemble_of_two_identical_models_equals_either(tiny_probe: ModelRef, texts: list[str], tmp_path: Path):
    folder = write_fused(
        tmp_path / "ensemble", ENSEMBLE, [Path(tiny_probe.path)] * 2, {"weights": [0.3, 0.7]}, {"candidate": "x"}
    )
    alone = _probabilities(tiny_probe.path, texts)
    assert torch.allclose(_probabilities(folder, texts), alone, atol=1e-5)
    assert count_parameters(load_classifier(folder).model) == 2 * count_parameters(
        load_classifier(tiny_probe.path).model
    )


def test_an_ensemble_is_the_weighted_mean_of_its_members_probabilities(
    tiny_probe: ModelRef, other: ModelRef, texts: list[str], tmp_path: Path
) -> None:
    members = [Path(tiny_probe.path), Path(other.path)]
    folder = write_fused(tmp_path / "ensemble", ENSEMBLE, members, {"weights": [1.0, 3.0]}, {"candidate": "ens"})
    first, second = (_probabilities(member, texts) for member in members)
    assert (first.argmax(1) != second.argmax(1)).any(), "the members must disagree somewhere for this to test much"
    fused = _probabilities(folder, texts)
    assert torch.allclose(fused, 0.25 * first + 0.75 * second, atol=1e-5)
    assert read_metadata(folder)["candidate"] == "ens" and read_metadata(folder)["fusion"]["kind"] == ENSEMBLE
    # self-contained: the members were copied, so the fused model outlives the run's folders
    shutil.rmtree(other.path)
    shutil.copytree(folder / "members" / "1", other.path)  # put it back for the other tests (same files)
    assert torch.allclose(_probabilities(folder, texts), fused)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 1.01])
def test_a_cascade_answers_with_the_fast_or_the_strong_model_by_its_threshold(
    tiny_probe: ModelRef, other: ModelRef, texts: list[str], tmp_path: Path, threshold: float
) -> None:
    fast, strong = _probabilities(other.path, texts), _probabilities(tiny_probe.path, texts)
    folder = write_fused(
        tmp_path / "cascade",
        CASCADE,
        [Path(other.path), Path(tiny_probe.path)],
        {"threshold": threshold},
        {"candidate": "cascade"},
    )
    loaded = load_classifier(folder)
    cascade = loaded.model
    assert isinstance(cascade, CascadeClassifier)
    answered = predict_proba(loaded, texts, batch_size=8)  # batches of mixed lengths: passed-on rows are trimmed
    sure = fast.max(dim=1).values >= threshold
    expected = torch.where(sure.unsqueeze(1), fast, strong)
    assert torch.allclose(answered, expected, atol=1e-5)
    assert cascade.texts_seen == len(texts) and cascade.texts_passed_on == int((~sure).sum())
    if threshold == 0.0:
        assert cascade.texts_passed_on == 0
    if threshold > 1:
        assert cascade.texts_passed_on == len(texts)
    if threshold == 0.5:
        assert 0 < cascade.texts_passed_on < len(texts), "this threshold must split the texts to test the mix"


def test_members_that_disagree_on_labels_cannot_be_fused(tiny_probe: ModelRef, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_probe.path, renamed)
    metadata = read_metadata(renamed)
    write_metadata(renamed, {**metadata, "label_names": list(reversed(metadata["label_names"]))})
    with pytest.raises(FusionError, match="label_names differ"):
        write_fused(tmp_path / "bad", ENSEMBLE, [Path(tiny_probe.path), renamed], {"weights": [1, 1]}, {})


def _accuracy_at(threshold: float, fast: np.ndarray, strong: np.ndarray, labels: np.ndarray) -> float:
    use_fast = fast.max(axis=1) >= threshold
    predicted = np.where(use_fast, fast.argmax(axis=1), strong.argmax(axis=1))
    return float((predicted == labels).mean())


def test_calibration_takes_the_lowest_threshold_within_the_margin() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    strong = np.eye(4)[labels] * 0.9 + 0.025  # right everywhere...
    strong[:20] = np.eye(4)[(labels[:20] + 1) % 4] * 0.9 + 0.025  # ...but 20 texts: 95%
    fast = rng.dirichlet(np.ones(4) * 0.3, 400)  # confident and random...
    confident_right = rng.random(400) < 0.5
    fast[confident_right] = np.eye(4)[labels[confident_right]] * 0.97 + 0.01  # ...or confidently right
    margin = 0.01
    calibration = calibrate_threshold(fast, strong, labels, margin)
    assert calibration.met
    assert _accuracy_at(calibration.threshold, fast, strong, labels) >= 0.95 - margin - 1e-12
    assert calibration.validation_accuracy == pytest.approx(_accuracy_at(calibration.threshold, fast, strong, labels))
    # the lowest: every distinct lower confidence value misses the target
    lower = sorted({float(c) for c in fast.max(axis=1) if c < calibration.threshold})
    assert all(_accuracy_at(t, fast, strong, labels) < 0.95 - margin for t in [0.0, *lower])
    assert calibration.validation_passed_on == pytest.approx(float((fast.max(axis=1) < calibration.threshold).mean()))


def test_the_cascade_curve_runs_from_the_fast_model_alone_to_the_strong_one_and_matches_each_threshold() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    fast = rng.dirichlet(np.ones(3), 300)
    strong = np.eye(3)[labels] * 0.8 + 0.2 / 3
    strong[:30] = np.eye(3)[(labels[:30] + 1) % 3] * 0.8 + 0.2 / 3  # 90% right
    thresholds = (0.0, 0.4, 0.6, 1.01)
    curve = cascade_curve(fast, strong, labels, ("accuracy", "macro_f1"), thresholds)
    assert [point["threshold"] for point in curve] == list(thresholds)
    assert curve[0]["passed_on"] == 0.0 and curve[-1]["passed_on"] == 1.0
    assert curve[0]["accuracy"] == pytest.approx(float((fast.argmax(1) == labels).mean()))  # the fast model alone
    assert curve[-1]["accuracy"] == pytest.approx(0.9)  # the strong model alone
    for point in curve:
        assert point["accuracy"] == pytest.approx(_accuracy_at(point["threshold"], fast, strong, labels))
    assert [p["passed_on"] for p in curve] == sorted(p["passed_on"] for p in curve)
    assert 0.0 < curve[1]["macro_f1"] <= 1.0


def test_a_cascades_estimated_speed_is_its_fast_model_alone_or_both_in_turn() -> None:
    assert cascade_texts_per_second(1000.0, 100.0, 0.0) == pytest.approx(1000.0)
    assert cascade_texts_per_second(1000.0, 100.0, 1.0) == pytest.approx(1 / (1 / 1000 + 1 / 100))
    assert cascade_texts_per_second(1000.0, 100.0, 0.2) == pytest.approx(1 / (0.001 + 0.002))


def test_a_calibration_that_must_pass_on_too_much_is_not_met() -> None:
    labels = np.arange(100) % 2
    strong = np.eye(2)[labels] * 0.8 + 0.1
    fast = np.full((100, 2), 0.5)
    fast[np.arange(100), 1 - labels] = 0.6  # confidently wrong on every text
    fast[np.arange(100), labels] = 0.4
    calibration = calibrate_threshold(fast, strong, labels, margin=0.005, max_passed_on=0.5)
    assert not calibration.met and calibration.validation_passed_on <= 0.5
    assert "NOT within" in calibration.describe()
    assert calibrate_threshold(fast, strong, labels, margin=0.005).met  # may pass everything on: met at > 1


def test_a_cascade_champion_is_served_as_one_model(
    tiny_domain: str, tiny_probe: ModelRef, other: ModelRef, texts: list[str], tmp_path: Path
) -> None:
    """Promoted into a registry and served over real HTTP: the answers are the cascade's own."""
    import httpx

    from domainflow.registry import ModelRegistry
    from serving import ApiKeys, ServingConfig, create_app
    from tests.process_helpers import ThreadedUvicorn

    folder = write_fused(
        tmp_path / "cascade", CASCADE, [Path(other.path), Path(tiny_probe.path)], {"threshold": 0.5}, {"candidate": "c"}
    )
    registry = ModelRegistry(tiny_domain, root=tmp_path / "registry" / tiny_domain)
    registry.promote(folder, metrics={"test": {"accuracy": 0.9}}, lineage={"candidate": "c"}, decision={"summary": "t"})
    key = "fusion-test-key-3b9d0c1e"
    app = create_app(
        ServingConfig(registry_root=tmp_path / "registry", domains=(tiny_domain,)), api_keys=ApiKeys([key])
    )
    server = ThreadedUvicorn(app).start()
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=60) as client:
            response = client.post(f"/v1/{tiny_domain}/predict", json={"texts": texts[:16]})
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    expected = _probabilities(folder, texts[:16])
    served = response.json()["predictions"]
    names = read_metadata(folder)["label_names"]
    assert [p["label"] for p in served] == [names[int(i)] for i in expected.argmax(dim=1)]
    assert {p["label"] for p in served} <= set(TINY_LABELS)
    assert [p["score"] for p in served] == pytest.approx(expected.max(dim=1).values.tolist(), abs=1e-4)


def test_fit_weights_finds_the_lowest_log_loss_on_the_grid() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    good = np.eye(3)[labels] * 0.8 + 0.2 / 3  # right, 0.8 sure
    noise = rng.dirichlet(np.ones(3), 300)  # uninformative
    assert fit_weights([good, noise], labels) == [1.0, 0.0]
    assert fit_weights([noise, good], labels) == [0.0, 1.0]
    # two halves each right on their own half: the best mix is found and beats both ends
    half = np.where((np.arange(300) < 150)[:, None], good, noise)
    other_half = np.where((np.arange(300) >= 150)[:, None], good, noise)
    weights = fit_weights([half, other_half], labels, step=0.05)

    def loss(w: list[float]) -> float:
        mixed = w[0] * half + w[1] * other_half
        return float(-np.log(mixed[np.arange(300), labels]).mean())

    assert loss(weights) <= min(loss([1.0, 0.0]), loss([0.0, 1.0]), loss([0.5, 0.5])) + 1e-12
    assert all(loss(weights) <= loss([w, 1 - w]) + 1e-12 for w in np.linspace(0, 1, 21))


def test_a_student_learns_from_the_ensembles_labels_and_is_judged_against_the_reference(
    tiny_domain: str,
    tiny_model_dir: Path,
    tiny_dataset: DatasetRef,
    tiny_probe: ModelRef,
    other: ModelRef,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ensemble (validation weights) is built from real members; the student's soft labels are the
    ensemble's (the teacher loaded for them is the ensemble's folder), its first layers the probe's."""
    import tasks.finetune
    from domainflow.spec import EnsembleSettings
    from tasks.compress import distill_model
    from tasks.fuse import build_ensemble_model, validation_probabilities

    ensemble = build_ensemble_model(
        [tiny_probe, other], tiny_dataset, EnsembleSettings(weights="validation"), tmp_path / "ensemble"
    )
    fusion = read_metadata(ensemble.path)["fusion"]
    probabilities = [validation_probabilities(member, tiny_dataset) for member in (tiny_probe, other)]
    assert fusion["weights"] == fit_weights([p for p, _ in probabilities], probabilities[0][1])
    assert fusion["member_names"] == ["linear_probe", "linear_probe"] and ensemble.name == "ensemble"

    loaded_as_teacher: list[str] = []
    real_load = tasks.finetune.load_classifier

    def recording_load(path, *args, **kwargs):  # the real loader; remembers which folders training read
        loaded_as_teacher.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(tasks.finetune, "load_classifier", recording_load)
    config = make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=5)
    student = distill_model(
        tiny_probe,
        tiny_dataset,
        config,
        tmp_path / "student",
        student_layers=1,
        epochs=1.0,
        temperature=2.0,
        alpha=0.5,
        soft_labels_from=ensemble,
        parent="ensemble",
    )
    assert loaded_as_teacher[-1] == ensemble.path  # (the student's own initial folder is read first)
    assert not any(path == tiny_probe.path for path in loaded_as_teacher)
    metadata = read_metadata(student.path)
    assert student.name == "distilled-l1-ensemble" and student.parent == "ensemble" and metadata["parent"] == "ensemble"
    assert metadata["compression_details"]["soft_labels_from"] == "ensemble"
    from datasets import load_from_disk

    test = load_from_disk(tiny_dataset.path)["test"]
    predicted = _probabilities(student.path, list(test["text"])).argmax(dim=1).numpy()
    assert float((predicted == np.asarray(test["label"])).mean()) >= 0.5  # six intents: chance is 1/6
