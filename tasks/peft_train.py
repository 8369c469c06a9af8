"""Parameter-efficient fine-tuning candidates (LoRA, IA3): one Prefect task per adapter the domain asks for.

Each starts from the linear probe, as the full fine-tune does, and trains by the same recipe
(``tasks.finetune.train_classifier`` with an ``adapter``): the encoder frozen, the adapter at its own learning
rate, the head at ``head_lr``, length-grouped batches, early stopping on validation, checkpoints and resume.
They are uncompressed candidates: evaluated like any other and ranked with ``finetuned`` on validation for the
reference (see ``domainflow.gates``). What they store and how they load: ``domainflow.peft_models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from domainflow.peft_models import AdapterMethod, adapter_methods, require_peft
from domainflow.records import DatasetRef, ModelRef
from domainflow.spec import PeftSettings
from tasks.caching import CODE_AND_INPUTS, require_shared
from tasks.finetune import (
    LINEAR_PROBE,
    TrainConfig,
    checkpoints_for,
    finish_atomically,
    model_dir,
    train_classifier,
)


def train_adapter(
    dataset: DatasetRef,
    init_dir: Path,
    config: TrainConfig,
    method: AdapterMethod,
    out_dir: Path,
    checkpoints: Path | None = None,
) -> ModelRef:
    """An adapter candidate named after its method (``lora``, ``ia3``), trained from ``init_dir`` (pure: no
    Prefect needed)."""
    return train_classifier(
        dataset,
        init_dir,
        config,
        out_dir,
        name=method.kind,
        parent=LINEAR_PROBE,
        epochs=method.epochs,
        checkpoints=checkpoints,
        adapter=method,
    )


@task(name="peft-train", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def peft_train(dataset: DatasetRef, init: ModelRef, config: TrainConfig, method: AdapterMethod) -> ModelRef:
    """A parameter-efficient candidate: ``method``'s adapter (and the head) trained on the frozen encoder."""
    require_shared(dataset, init)
    target = model_dir(dataset, method.kind, peft_train, init.fingerprint, config, method)
    return finish_atomically(
        lambda out: train_adapter(dataset, Path(init.path), config, method, out, checkpoints_for(target)), target
    )


def adapter_candidates(
    settings: PeftSettings, dataset: DatasetRef, probe: Any, config: TrainConfig, options: dict[str, Any]
) -> list[Any]:
    """The domain's adapters, submitted at once from the probe (a future, or its record): futures of
    ``ModelRef`` in the order of ``settings.methods``; none when the domain lists no method. A missing
    ``peft`` library fails here, before any training."""
    if not settings.methods:
        return []
    require_peft()
    return [
        peft_train.with_options(**options).submit(dataset, probe, config, method)
        for method in adapter_methods(settings)
    ]
