"""DP-SGD (opacus) and federated (Flower) candidates on the tiny two-layer MiniLM and the six-intent slice: the
privacy budget a run records, the gate that reads it, the clients' partitions, FedAvg's average, and that both
kinds of folder load as the candidates they mirror."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from domainflow.catalog import get_domain
from domainflow.footprint import FOOTPRINT_KEY
from domainflow.gates import decide, select_reference
from domainflow.modeling import load_classifier, predict_logits, read_metadata
from domainflow.peft_models import ADAPTER_KEY, encoder_fingerprint
from domainflow.records import Evaluation, ModelRef
from domainflow.spec import ClassificationSpec, DataSource, PeftSettings, PrivacySettings, QualityGates
from domainflow.training_keys import FEDERATED_KEY, PRIVACY_KEY

pytest.importorskip("opacus")
pytest.importorskip("flwr")
pytest.importorskip("peft")

from domainflow.federated import FederatedMethod, FederatedSetup, partition_rows, run_federated  # noqa: E402
from domainflow.local_training import lora_method  # noqa: E402
from domainflow.private_training import DpMethod, dp_methods  # noqa: E402
from tasks.finetune import make_train_config  # noqa: E402
from tasks.private_train import base_spec, build_federated, build_private, dp_train  # noqa: E402

LORA = lora_method(PeftSettings(lora_rank=4, lora_alpha=8, target_modules=("query", "value")), 2e-2)


def dp_head(epsilon: float) -> DpMethod:
    return DpMethod(
        trainable="head", target_epsilon=epsilon, max_grad_norm=1.0, epochs=3, batch_size=32, learning_rate=5e-2
    )


@pytest.fixture(scope="module")
def config(tiny_domain: str, tiny_model_dir: Path):
    return make_train_config(get_domain(tiny_domain), str(tiny_model_dir), epochs=1.0, seed=7)


@pytest.fixture(scope="module")
def train_labels(tiny_dataset) -> np.ndarray:
    from datasets import load_from_disk

    return np.asarray(load_from_disk(tiny_dataset.path)["train"]["label"])


@pytest.fixture(scope="module")
def dp_heads(tiny_dataset, config, tmp_path_factory: pytest.TempPathFactory) -> dict[float, ModelRef]:
    """dp-head trained and saved at two privacy budgets."""
    out = tmp_path_factory.mktemp("dp-head")
    return {eps: build_private(tiny_dataset, config, dp_head(eps), out / f"eps{eps:g}") for eps in (8.0, 1.0)}


def test_dp_head_spends_at_most_its_budget_and_records_it(dp_heads, tiny_dataset, tiny_domain, train_labels, tmp_path):
    from tasks.evaluate import evaluate_candidate
    from tasks.report import privacy_lines

    rows = len(train_labels)
    for epsilon, ref in dp_heads.items():
        spent = read_metadata(ref.path)[PRIVACY_KEY]
        assert 0 < spent["epsilon"] <= epsilon, spent
        assert spent["epsilon"] > 0.8 * epsilon  # the noise is calibrated to the budget, not far below it
        assert spent["delta"] == pytest.approx(1 / (10 * rows))
        assert spent["train_rows"] == rows and spent["steps"] > 0
        assert spent["sample_rate"] == pytest.approx(1 / math.ceil(rows / 32))  # opacus: 1 / batches per epoch
        assert spent["steps"] == 3 * math.ceil(rows / 32)  # every planned step ran: the budget is spent as planned
    # a smaller budget needs more noise for the same steps
    noise = {eps: read_metadata(ref.path)[PRIVACY_KEY]["noise_multiplier"] for eps, ref in dp_heads.items()}
    assert noise[1.0] > 1.5 * noise[8.0] > 0, noise

    # the folder is an ordinary classifier: the pretrained encoder and the trained head; it predicts
    ref = dp_heads[8.0]
    evaluation = evaluate_candidate(ref, tiny_dataset, get_domain(tiny_domain).evaluation_slice(), tmp_path)
    assert evaluation.training[PRIVACY_KEY] == read_metadata(ref.path)[PRIVACY_KEY]
    assert evaluation.training["trainable_parameters"] == 384 * len(tiny_dataset.label_names) + len(
        tiny_dataset.label_names
    )
    assert evaluation.test_metrics["accuracy"] > 0.3  # six intents in the data: chance is 0.17
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["training"][PRIVACY_KEY]["epsilon"] == evaluation.training[PRIVACY_KEY]["epsilon"]
    card = "\n".join(privacy_lines(evaluation))
    assert f"epsilon = {evaluation.training[PRIVACY_KEY]['epsilon']:.3f}" in card


def test_dp_lora_trains_the_adapter_privately_and_saves_a_peft_folder(tiny_dataset, config, tmp_path) -> None:
    method = DpMethod(
        trainable="lora", target_epsilon=4.0, max_grad_norm=1.0, epochs=1, batch_size=48, learning_rate=2e-2,
        adapter=LORA,
    )  # fmt: skip
    ref = build_private(tiny_dataset, config, method, tmp_path / "dp-lora")
    metadata = read_metadata(ref.path)
    assert ref.name == "dp-lora" and metadata[ADAPTER_KEY]["kind"] == "lora"
    assert 0 < metadata[PRIVACY_KEY]["epsilon"] <= 4.0 and metadata[PRIVACY_KEY]["trainable"] == "lora"
    labels = len(tiny_dataset.label_names)
    assert metadata[FOOTPRINT_KEY]["trainable_parameters"] == 2 * 2 * (2 * 384 * 4) + labels * 384 + labels
    unmerged = load_classifier(ref.path, merge_adapter=False)
    lora_b = [p for name, p in unmerged.torch_model.named_parameters() if "lora_B" in name]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b)  # B starts at zero: DP-SGD moved it
    assert encoder_fingerprint(unmerged.torch_model.encoder) == metadata[ADAPTER_KEY]["base"]["fingerprint"]


def test_dp_settings_become_methods_and_every_setting_names_the_folder(tiny_dataset, config) -> None:
    from tasks.finetune import model_dir

    settings = PrivacySettings(methods=("head", "lora"), target_epsilon=3.0, lora_lr=1e-3)
    head, lora = dp_methods(settings, PeftSettings(lora_rank=16))
    assert head.name == "dp-head" and head.adapter is None and head.learning_rate == settings.head_lr
    assert lora.adapter is not None and lora.adapter.rank == 16 and lora.learning_rate == 1e-3
    folders = {
        model_dir(tiny_dataset, m.name, dp_train, config, m)
        for m in (
            head,
            head.model_copy(update={"target_epsilon": 2.0}),
            head.model_copy(update={"target_delta": 1e-6}),
            head.model_copy(update={"max_grad_norm": 0.5}),
            head.model_copy(update={"epochs": 4}),
            head.model_copy(update={"batch_size": 64}),
        )
    }
    assert len(folders) == 6


def evaluation(name: str, accuracy: float, *, epsilon: float | None = None, compression: str | None = None,
               parent: str | None = None) -> Evaluation:  # fmt: skip
    training = {} if epsilon is None else {PRIVACY_KEY: {"epsilon": epsilon, "delta": 1e-5}}
    return Evaluation(
        candidate=ModelRef(name=name, path=f"/m/{name}", fingerprint=name, parent=parent, compression=compression),
        test_metrics={"accuracy": accuracy, "macro_f1": accuracy},
        validation_metrics={"accuracy": accuracy, "macro_f1": accuracy},
        texts_per_second_batch32=300.0 if compression else 100.0,
        size_bytes=1,
        disk_bytes=1,
        parameters=1,
        report_dir=f"/r/{name}",
        training=training,
    )


def private_spec(max_epsilon: float | None, target_epsilon: float = 1.0) -> ClassificationSpec:
    return ClassificationSpec(
        name="toy",
        source=DataSource(train="a.csv", test="b.csv"),
        labels=("a", "b"),
        gates=QualityGates(min_metrics={"accuracy": 0.5}, max_epsilon=max_epsilon),
        privacy=PrivacySettings(methods=("head",), target_epsilon=target_epsilon),
    )


def test_gate_refuses_candidates_over_max_epsilon_with_their_numbers() -> None:
    candidates = [
        evaluation("finetuned", 0.95),  # the best, but no guarantee
        evaluation("dp-lora", 0.90, epsilon=7.9),  # private, over the limit
        evaluation("dp-head", 0.80, epsilon=0.98),
        evaluation("dp-head-int8", 0.795, epsilon=0.98, compression="onnx_int8", parent="dp-head"),
    ]
    decision = decide(private_spec(2.0), candidates, None)
    assert decision.chosen == "dp-head-int8" and decision.promote
    assert decision.gates["max_epsilon"] == 2.0
    finetuned, dp_lora = decision.verdict("finetuned"), decision.verdict("dp-lora")
    assert not finetuned.eligible and any("no differential-privacy guarantee" in r for r in finetuned.reasons)
    assert not dp_lora.eligible and "epsilon 7.900 (delta 1e-05) > max_epsilon 2" in dp_lora.reasons
    assert dp_lora.numbers["epsilon"] == 7.9
    assert decision.verdict("dp-head").role == "reference"
    assert select_reference(candidates, "accuracy", 2.0).candidate.name == "dp-head"
    # without the requirement the non-private model is the reference, as before
    assert decide(private_spec(None), candidates, None).chosen == "finetuned"
    # no candidate within the limit: nothing ships, and the summary says why
    none = decide(private_spec(0.5, target_epsilon=0.5), candidates, None)
    assert none.chosen is None and "max_epsilon 0.5" in none.summary
    with pytest.raises(ValueError, match="within max_epsilon 0.5"):
        select_reference(candidates, "accuracy", 0.5)


def test_a_privacy_gate_no_candidate_could_meet_is_a_domain_error() -> None:
    with pytest.raises(ValueError, match="requires DP candidates"):
        private_spec(None).replace(gates=QualityGates(max_epsilon=2.0), privacy=PrivacySettings())
    with pytest.raises(ValueError, match="target_epsilon 8.0 exceeds gates.max_epsilon 2.0"):
        private_spec(None).replace(gates=QualityGates(max_epsilon=2.0), privacy=PrivacySettings(methods=("head",)))


@pytest.mark.parametrize("scheme", ["dirichlet", "shards"])
def test_partitions_are_disjoint_cover_the_split_and_skew_labels(scheme: str) -> None:
    labels = np.repeat(np.arange(10), 30)  # 10 balanced labels, 300 rows
    parts = partition_rows(labels, 5, scheme, alpha=0.3, shards_per_client=2, seed=3)
    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))  # disjoint and covering
    # non-IID: each client's label histogram is far from the global uniform one (total variation > 0.3)
    distances = [0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - 0.1).sum() for p in parts]
    assert min(distances) > 0.3, distances
    if scheme == "shards":
        assert all(len(np.unique(labels[p])) <= 4 for p in parts)  # 2 shards of 30 label-sorted rows each
    assert all(
        (a == b).all() for a, b in zip(parts, partition_rows(labels, 5, scheme, alpha=0.3, seed=3), strict=True)
    )  # seeded
    iid = partition_rows(labels, 5, "iid", seed=3)
    assert max(0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - 0.1).sum() for p in iid) < 0.3


def test_partitions_refuse_more_clients_than_rows() -> None:
    with pytest.raises(ValueError, match="3 training rows cannot be divided among 5 clients"):
        partition_rows([0, 1, 2], 5, "dirichlet")


@pytest.fixture(scope="module")
def federated_lora(tiny_dataset, config):
    method = FederatedMethod(
        trainable="lora", clients=3, rounds=1, local_epochs=1.0, partition="dirichlet", alpha=0.5, batch_size=16,
        learning_rate=2e-2, adapter=LORA,
    )  # fmt: skip
    setup = FederatedSetup(
        dataset_path=tiny_dataset.path, num_labels=len(tiny_dataset.label_names), base=base_spec(config),
        method=method, seed=config.seed,
    )  # fmt: skip
    return run_federated(setup)


def test_federated_clients_get_disjoint_non_iid_shards_covering_the_split(federated_lora, train_labels) -> None:
    parts = federated_lora.partitions
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(train_labels)))
    assert federated_lora.record["client_rows"] == [len(p) for p in parts]
    global_share = np.bincount(train_labels, minlength=77) / len(train_labels)
    skew = [0.5 * np.abs(np.bincount(train_labels[p], minlength=77) / len(p) - global_share).sum() for p in parts]
    assert max(skew) > 0.2, skew  # Dirichlet(0.5) over 6 labels: at least one branch sees a very different mix


def test_fedavg_is_the_row_weighted_mean_of_the_clients(federated_lora) -> None:
    answers = federated_lora.last_round
    assert sorted(rows for rows, _ in answers) == sorted(federated_lora.record["client_rows"])
    weights = np.array([rows for rows, _ in answers], dtype=np.float64)
    global_weights = federated_lora.trainable.trainable_arrays()
    assert len(global_weights) == len(answers[0][1]) == 2 * 2 * 2 + 2  # lora A and B of 2 modules x 2 layers + head
    for i, actual in enumerate(global_weights):
        expected = (
            sum(w * arrays[i].astype(np.float64) for w, (_, arrays) in zip(weights, answers, strict=True))
            / weights.sum()
        )
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    # the clients really trained apart: their answers differ from each other
    assert float(np.abs(answers[0][1][-2] - answers[1][1][-2]).max()) > 1e-4


def test_federated_candidate_loads_like_a_peft_candidate(tiny_dataset, config, tmp_path) -> None:
    from datasets import load_from_disk

    method = FederatedMethod(
        trainable="lora", clients=2, rounds=2, local_epochs=1.0, partition="shards", batch_size=16,
        learning_rate=2e-2, adapter=LORA,
    )  # fmt: skip
    ref = build_federated(tiny_dataset, config, method, tmp_path / "federated-lora")
    metadata = read_metadata(ref.path)
    assert ref.name == "federated-lora" and metadata[ADAPTER_KEY]["kind"] == "lora"
    assert metadata[FEDERATED_KEY]["clients"] == 2 and len(metadata[FEDERATED_KEY]["round_validation_accuracy"]) == 3
    texts = list(load_from_disk(tiny_dataset.path)["test"]["text"])
    merged, unmerged = load_classifier(ref.path), load_classifier(ref.path, merge_adapter=False)
    torch.testing.assert_close(predict_logits(merged, texts), predict_logits(unmerged, texts), atol=1e-4, rtol=1e-4)
    assert PRIVACY_KEY not in metadata  # federated is not differentially private


def test_under_max_epsilon_the_compressions_that_retrain_without_dp_are_not_built() -> None:
    """FFN pruning's recovery epochs and distillation train on the training split without DP (the gate refuses
    them under max_epsilon), and the cascade is built on the student: none is built; int8 and magnitude pruning,
    which keep their parent's guarantee, are."""
    from domainflow.spec import CompressionDefaults
    from flows.pipeline import private_compression

    compression = CompressionDefaults(methods=("onnx_int8", "magnitude_prune", "ffn_prune", "distill", "cascade"))
    assert private_compression(compression, None) is compression
    assert private_compression(compression, 2.0).methods == ("onnx_int8", "magnitude_prune")
