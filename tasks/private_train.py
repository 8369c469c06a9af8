"""Private and federated candidates: one Prefect task per DP (``dp-head``, ``dp-lora``) or federated
(``federated-head``, ``federated-lora``) candidate the domain asks for.

Each trains from the pretrained encoder and a zero head (not from the linear probe: see
``domainflow.local_training``), so it depends only on the dataset, the training config (base model, layers,
max length, seed) and its own method record, which holds every setting of its ``[privacy]`` or ``[federated]``
table (and the LoRA settings of ``[peft]`` for a ``lora`` method): all of them are in the task's cache key and in
its folder's name. They are uncompressed candidates, evaluated and gated like any other; the gates read the
epsilon a DP candidate spent (``gates.max_epsilon``). What they store: ``domainflow.private_training``,
``domainflow.federated``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from domainflow.federated import FederatedMethod, federated_methods, require_flwr, train_federated
from domainflow.fingerprint import path_fingerprint
from domainflow.local_training import BaseSpec
from domainflow.logs import run_logger
from domainflow.private_training import DpMethod, dp_methods, require_opacus, train_private
from domainflow.records import DatasetRef, ModelRef
from domainflow.spec import FederatedSettings, PeftSettings, PrivacySettings
from tasks.caching import CODE_AND_INPUTS, require_shared
from tasks.finetune import TrainConfig, finish_atomically, model_dir


def base_spec(config: TrainConfig) -> BaseSpec:
    """What of the training config a private or federated candidate uses: the base encoder and how texts are fed."""
    return BaseSpec(base_model=config.base_model, num_layers=config.num_layers, max_length=config.max_length)


def build_private(dataset: DatasetRef, config: TrainConfig, method: DpMethod, out_dir: Path) -> ModelRef:
    """A DP candidate's folder (pure: no Prefect needed)."""
    run = train_private(dataset.path, list(dataset.label_names), base_spec(config), method, config.seed, out_dir)
    privacy = run.record
    run_logger(__name__).info(
        "%s: epsilon %.3f spent of %.3g (delta %.2g; noise multiplier %.3f, clip %.3g, %d steps at sample rate %.4f)",
        method.name,
        privacy["epsilon"],
        method.target_epsilon,
        privacy["delta"],
        privacy["noise_multiplier"],
        method.max_grad_norm,
        privacy["steps"],
        privacy["sample_rate"],
    )
    return ModelRef(
        name=method.name, path=str(out_dir), fingerprint=path_fingerprint(out_dir), train_seconds=run.seconds
    )


def build_federated(dataset: DatasetRef, config: TrainConfig, method: FederatedMethod, out_dir: Path) -> ModelRef:
    """A federated candidate's folder (pure: no Prefect needed)."""
    run = train_federated(dataset.path, list(dataset.label_names), base_spec(config), method, config.seed, out_dir)
    run_logger(__name__).info(
        "%s: %d clients (rows %s), %d rounds; validation accuracy by round %s",
        method.name,
        method.clients,
        run.record["client_rows"],
        method.rounds,
        ", ".join(f"{a:.3f}" for a in run.record["round_validation_accuracy"]),
    )
    return ModelRef(
        name=method.name, path=str(out_dir), fingerprint=path_fingerprint(out_dir), train_seconds=run.seconds
    )


@task(name="dp-train", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def dp_train(dataset: DatasetRef, config: TrainConfig, method: DpMethod) -> ModelRef:
    """A differentially private candidate: ``method``'s trainable set trained with DP-SGD (opacus)."""
    require_shared(dataset)
    target = model_dir(dataset, method.name, dp_train, config, method)
    return finish_atomically(lambda out: build_private(dataset, config, method, out), target)


@task(name="federated-train", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def federated_train(dataset: DatasetRef, config: TrainConfig, method: FederatedMethod) -> ModelRef:
    """A federated candidate: ``method``'s trainable set trained by simulated clients and Flower's FedAvg."""
    require_shared(dataset)
    target = model_dir(dataset, method.name, federated_train, config, method)
    return finish_atomically(lambda out: build_federated(dataset, config, method, out), target)


def private_candidates(
    privacy: PrivacySettings,
    federated: FederatedSettings,
    peft: PeftSettings,
    dataset: DatasetRef,
    config: TrainConfig,
    options: dict[str, Any],
) -> list[Any]:
    """The domain's DP and federated candidates, submitted at once: futures of ``ModelRef``, DP ones first, each
    table in its order; none when both tables list no method. A missing library fails here, before any training."""
    dp = dp_methods(privacy, peft)
    fed = federated_methods(federated, peft)
    if dp:
        require_opacus()
    if fed:
        require_flwr()
    return [dp_train.with_options(**options).submit(dataset, config, method) for method in dp] + [
        federated_train.with_options(**options).submit(dataset, config, method) for method in fed
    ]
