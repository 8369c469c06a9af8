"""Differentially private candidates: DP-SGD with opacus on a small trainable set of the frozen encoder.

Why its own loop: opacus does not plug into the transformers Trainer. It needs the model wrapped for per-example
gradients, the optimizer wrapped to clip each example's gradient to ``max_grad_norm`` and add Gaussian noise, and
the data loader replaced by Poisson sampling (each row joins each step independently with rate ``b/n``, which is
what the accountant's subsampling amplification assumes). :func:`train_private` is that loop, with
``PrivacyEngine.make_private_with_epsilon`` choosing the noise multiplier that spends at most ``target_epsilon``
over the planned steps, and the PRV accountant reporting what was actually spent.

What trains (:mod:`domainflow.local_training`): the head alone (on the frozen encoder's embeddings, computed
once) or a LoRA adapter and the head. Not the whole encoder: every layer type of MiniLM is one opacus handles
(``Linear``, ``LayerNorm``, ``Embedding``; ``ModuleValidator`` finds nothing to fix), but per-example gradients
of the 30,522 x 384 word-embedding table alone take 47 MB per example, 12 GB for a batch of 256: so the
embeddings, like the rest of the encoder, stay frozen, and only LoRA's ``Linear`` matrices and the head get
per-example gradients.

What the guarantee covers, recorded with it in the candidate's metadata (:data:`PRIVACY_KEY`): the training
split, at the example level (add/remove one row), for the weights this loop trains. The pretrained encoder is
public data. The validation split (ranking candidates) and the test split (gates) are used without privacy, as
every candidate uses them; the noise comes from torch's ordinary generator, not a cryptographically secure one
(opacus's ``secure_mode`` needs torchcsprng), which is the usual trade for a research-grade guarantee.

``opacus`` is an optional extra (``pip install -e '.[privacy]'``): nothing here imports it until a DP candidate
trains.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from domainflow.footprint import FOOTPRINT_KEY, footprint, training_section
from domainflow.local_training import (
    BaseSpec,
    BatchLogits,
    TrainedRun,
    batch_loss,
    build_trainable,
    require_library,
    save_trainable,
    trainable_settings,
)
from domainflow.peft_models import AdapterMethod
from domainflow.spec import PeftSettings, PrivacySettings, TrainableSet
from domainflow.training_keys import PRIVACY_KEY

ACCOUNTANT = "prv"  # opacus's default: the tightest of its accountants for many steps of the subsampled Gaussian


def candidate_name(trainable: TrainableSet) -> str:
    return f"dp-{trainable}"


class DpMethod(BaseModel):
    """One DP candidate to train, with every setting its weights and its guarantee depend on (a cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trainable: TrainableSet
    target_epsilon: float = Field(gt=0.0)
    target_delta: float | None = Field(None, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(gt=0.0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0)
    adapter: AdapterMethod | None = None

    @property
    def name(self) -> str:
        return candidate_name(self.trainable)

    def delta_for(self, rows: int) -> float:
        """The delta of the guarantee: the configured one, or 1/(10 n), an order below the 1/n a mechanism that
        publishes one whole row with probability delta would meet."""
        return self.target_delta if self.target_delta is not None else 1.0 / (10 * rows)


def dp_methods(settings: PrivacySettings, peft: PeftSettings) -> list[DpMethod]:
    """The domain's ``[privacy]`` table as one record per DP candidate, in its order. A ``head`` record holds no
    LoRA setting, so changing the LoRA rank does not retrain ``dp-head``."""
    return [
        DpMethod(
            trainable=trainable,
            target_epsilon=settings.target_epsilon,
            target_delta=settings.target_delta,
            max_grad_norm=settings.max_grad_norm,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            **trainable_settings(trainable, settings.head_lr, settings.lora_lr, peft),
        )
        for trainable in settings.methods
    ]


def require_opacus() -> None:
    """Fail before any work, saying how to install the optional ``privacy`` extra."""
    require_library("opacus", "differentially private candidates", "privacy", "privacy")


def fit_private(
    texts: list[str], labels: list[int], num_labels: int, base: BaseSpec, method: DpMethod, seed: int
) -> TrainedRun:
    """Train ``method``'s trainable set with DP-SGD on the rows ``texts``/``labels`` (see the module docstring)."""
    require_opacus()
    import opacus
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if not texts:
        raise ValueError("DP training needs at least one training row")
    rows = len(texts)
    delta = method.delta_for(rows)
    with training_section() as section:  # one training loop at a time in a process (domainflow.footprint)
        torch.manual_seed(seed)  # the Poisson sampler and the noise draw from torch's global generator
        trainable = build_trainable(base, num_labels, method.trainable, method.adapter)
        logits_of = BatchLogits(trainable, texts, base.max_length)
        module = trainable.trainable_module()
        module.train()  # LoRA: the encoder's dropout as in the Trainer recipe; the head has none
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=method.learning_rate)
        rows_and_labels = TensorDataset(torch.arange(rows), torch.tensor(labels, dtype=torch.long))
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        private_module, private_optimizer, loader = engine.make_private_with_epsilon(
            module=module,
            optimizer=optimizer,
            data_loader=DataLoader(rows_and_labels, batch_size=min(method.batch_size, rows)),
            target_epsilon=method.target_epsilon,
            target_delta=delta,
            epochs=method.epochs,
            max_grad_norm=method.max_grad_norm,
            poisson_sampling=True,
        )
        steps = 0
        for _ in range(method.epochs):
            for index, batch_labels in loader:
                private_optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(logits_of(private_module, index), batch_labels)
                loss.backward()
                private_optimizer.step()
                steps += 1
        remove_hooks = getattr(private_module, "remove_hooks", None)
        if remove_hooks is not None:  # the model is saved and evaluated as a plain module
            remove_hooks()
        spent = float(engine.get_epsilon(delta))
    seconds = section.seconds
    sample_rate = float(getattr(loader, "sample_rate", 0.0) or 0.0)
    privacy = {
        "mechanism": f"DP-SGD (opacus {opacus.__version__}): per-example clipping, Gaussian noise, Poisson sampling",
        "epsilon": spent,
        "delta": delta,
        "target_epsilon": method.target_epsilon,
        "noise_multiplier": float(private_optimizer.noise_multiplier),
        "max_grad_norm": method.max_grad_norm,
        "sample_rate": sample_rate,
        "expected_batch_size": sample_rate * rows,
        "steps": steps,
        "epochs": method.epochs,
        "train_rows": rows,
        "accountant": ACCOUNTANT,
        "trainable": method.trainable,
        "unit": "one training row (add/remove)",
        "covers": "the training split; validation and test are used without privacy, the base encoder is public",
        "secure_rng": False,
    }  # no training loss: computed from the private rows without noise, publishing it would leak past epsilon
    return TrainedRun(trainable, privacy, seconds, footprint(trainable.model, section.peak, seconds))


def train_private(
    dataset_path: str | Path,
    label_names: list[str],
    base: BaseSpec,
    method: DpMethod,
    seed: int,
    out_dir: Path,
) -> TrainedRun:
    """Train a DP candidate on the training split of the dataset at ``dataset_path`` and save its folder."""
    from datasets import load_from_disk

    train = load_from_disk(str(dataset_path))["train"]
    run = fit_private(list(train["text"]), list(train["label"]), len(label_names), base, method, seed)
    records = {FOOTPRINT_KEY: run.footprint, PRIVACY_KEY: run.record}
    save_trainable(run.trainable, out_dir, method.name, base, label_names, run.seconds, records)
    return run
