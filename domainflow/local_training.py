"""The small trainable set that private (DP-SGD) and federated candidates train, and how it is saved.

Both train only a few weights on top of the frozen pretrained encoder (:data:`domainflow.spec.TrainableSet`):

* ``head``: the linear head alone. The frozen encoder's mean-pooled embedding of a text never changes, so it is
  computed once (:func:`text_features`) and the head trains on those features: per-example gradients (DP) and
  per-client rounds (federated) then cost a matrix product, not a pass through the encoder.
* ``lora``: a LoRA adapter (peft, the domain's ``[peft]`` rank, alpha and modules) and the head, trained through
  the encoder on token ids (:func:`token_batch`).

Why start from the pretrained encoder and a zero head rather than from the linear probe the other candidates
start from: the probe is fit on the training texts with no privacy guarantee and on all clients' rows at once,
so a DP or federated candidate initialised from it would be neither private nor federated.

The result is saved like the candidates it mirrors: a ``head`` model as an ordinary classifier folder (the
pretrained encoder's weights and the trained head, as the linear probe), a ``lora`` model as a PEFT candidate
folder (``domainflow.peft_models``: adapter + head + the base's path and fingerprint). Either loads, exports to
int8 and serves as those do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from domainflow.modeling import TextClassifier, embed_texts, encode_texts, load_encoder, pad_batch, save_classifier
from domainflow.peft_models import AdapterMethod, BaseEncoder, adapter_methods, attach_adapter, save_adapter_classifier
from domainflow.spec import PeftSettings, TrainableSet


class BaseSpec(BaseModel):
    """The pretrained encoder a private or federated candidate trains on, and how texts are fed to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str
    num_layers: int | None = None
    max_length: int = 128


def lora_method(peft: PeftSettings, learning_rate: float) -> AdapterMethod:
    """The LoRA adapter the domain's ``[peft]`` table describes (rank, alpha, modules), at ``learning_rate``."""
    method = adapter_methods(peft.replace(methods=("lora",)))[0]
    return method.model_copy(update={"learning_rate": learning_rate, "epochs": None})


@dataclass
class TrainedRun:
    """A model trained in memory, not yet saved, with what its training recorded (a DP run's privacy accounting, a
    federated run's clients and rounds), its wall time and its footprint."""

    trainable: TrainableModel
    record: dict[str, Any]
    seconds: float
    footprint: dict[str, Any]


def trainable_settings(trainable: TrainableSet, head_lr: float, lora_lr: float, peft: PeftSettings) -> dict[str, Any]:
    """A method record's learning rate and adapter for ``trainable``: a ``head`` record holds no LoRA setting, so
    changing the LoRA rank does not retrain a head-only candidate."""
    if trainable == "head":
        return {"learning_rate": head_lr, "adapter": None}
    return {"learning_rate": lora_lr, "adapter": lora_method(peft, lora_lr)}


def require_library(module: str, what: str, extra: str, table: str) -> None:
    """Fail before any work, saying which optional extra installs the library ``what`` needs."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"{what} need {module}: pip install -e '.[{extra}]' (or remove the methods of the domain's [{table}] table)"
        )


@dataclass
class TrainableModel:
    """A classifier whose encoder is frozen, with what training and saving it need."""

    model: TextClassifier
    tokenizer: Any
    trainable: TrainableSet
    base: BaseEncoder | None  # the base under the LoRA adapter (None for head-only)
    adapter: AdapterMethod | None

    def trainable_module(self) -> nn.Module:
        """What the optimizer (and opacus) wraps: the head alone for ``head``, the whole classifier for ``lora``
        (its frozen parameters get no gradient and no per-example gradient)."""
        return self.model.classifier if self.trainable == "head" else self.model

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters by name, in a fixed order: what federated clients exchange."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def trainable_arrays(self) -> list[np.ndarray]:
        return [p.detach().cpu().numpy().copy() for _, p in self.named_trainable()]

    def load_trainable_arrays(self, arrays: Sequence[np.ndarray]) -> None:
        named = self.named_trainable()
        if len(arrays) != len(named):
            raise ValueError(f"expected {len(named)} trainable arrays, got {len(arrays)}")
        with torch.no_grad():
            for (name, parameter), array in zip(named, arrays, strict=True):
                if tuple(array.shape) != tuple(parameter.shape):
                    raise ValueError(f"{name}: shape {tuple(array.shape)} does not match {tuple(parameter.shape)}")
                parameter.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))


def build_trainable(
    base: BaseSpec, num_labels: int, trainable: TrainableSet, adapter: AdapterMethod | None = None
) -> TrainableModel:
    """The pretrained encoder, frozen, with a zero head (and for ``lora`` the adapter, whose B matrices start at
    zero too: the model starts at uniform predictions, a point that depends on no training text)."""
    encoder, tokenizer = load_encoder(base.base_model, base.num_layers)
    model = TextClassifier(encoder, num_labels=num_labels)
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    recorded = None
    if trainable == "lora":
        if adapter is None or adapter.kind != "lora":
            raise ValueError("a lora trainable set needs a LoRA adapter method")
        recorded = attach_adapter(model, adapter, base.base_model, base.num_layers)
    return TrainableModel(model, tokenizer, trainable, recorded, adapter if trainable == "lora" else None)


_FEATURES: dict[str, torch.Tensor] = {}  # the last few feature tables of this process (see text_features)
_FEATURES_KEPT = 3  # a run's training and validation splits, and a benchmark's test split


def text_features(trainable: TrainableModel, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Mean-pooled embeddings of the frozen encoder (eval mode: no dropout), what a head-only model trains on.

    The encoder is the pretrained one, untouched, so the same texts give the same table whichever head-only
    candidate asks: a run's ``dp-head`` and ``federated-head`` (or a benchmark's several budgets) embed the
    training split once. Keyed by the encoder's weights fingerprint, the length limit and the texts."""
    from domainflow.fingerprint import value_fingerprint
    from domainflow.peft_models import encoder_fingerprint

    key = value_fingerprint(encoder_fingerprint(trainable.model.encoder), max_length, list(texts))
    if key not in _FEATURES:
        while len(_FEATURES) >= _FEATURES_KEPT:
            _FEATURES.pop(next(iter(_FEATURES)))
        _FEATURES[key] = embed_texts(trainable.model, trainable.tokenizer, list(texts), max_length)
    return _FEATURES[key]


def token_batch(encoded: Sequence[Sequence[int]], index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of the rows ``index`` of pre-tokenized texts, padded to the longest;
    an empty index (a Poisson-sampled batch may be empty) gives zero-row tensors."""
    if len(index) == 0:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    input_ids, attention_mask = pad_batch([encoded[i] for i in index], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class BatchLogits:
    """Logits of a batch of training rows, whichever the trainable set: from the cached features for ``head``,
    through the encoder for ``lora`` (``module`` is what the optimizer or opacus wrapped)."""

    def __init__(self, trainable: TrainableModel, texts: Sequence[str], max_length: int) -> None:
        self.trainable = trainable.trainable
        if self.trainable == "head":
            self.features = text_features(trainable, texts, max_length)
        else:
            self.encoded = encode_texts(trainable.tokenizer, texts, max_length)
            pad = trainable.tokenizer.pad_token_id
            self.pad_id = pad if pad is not None else 0

    def __call__(self, module: nn.Module, index: torch.Tensor) -> torch.Tensor:
        rows = index.tolist()
        if self.trainable == "head":
            return module(self.features[index])
        return module(**token_batch(self.encoded, rows, self.pad_id))["logits"]


def batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch; zero (still on the graph) for an empty batch, whose mean would be NaN."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, labels)


def save_trainable(
    trainable: TrainableModel,
    out_dir: Path,
    name: str,
    base: BaseSpec,
    label_names: list[str],
    seconds: float,
    records: dict[str, Any],
) -> Path:
    """Write the trained model as the candidate folder it mirrors (see the module docstring), with what its
    training recorded (``records``) in its metadata."""
    metadata = {
        "candidate": name,
        "base_model": base.base_model,
        "init": "pretrained encoder, zero head",
        "train_seconds": seconds,
        **records,  # the footprint, and the privacy or federation record
    }
    max_length = base.max_length
    trainable.model.eval()
    for parameter in trainable.model.parameters():  # opacus leaves per-example gradients on the parameters
        for attribute in ("grad_sample", "_forward_counter"):
            if hasattr(parameter, attribute):
                delattr(parameter, attribute)
    if trainable.trainable == "lora":
        assert trainable.adapter is not None and trainable.base is not None
        return save_adapter_classifier(
            trainable.model,
            trainable.tokenizer,
            out_dir,
            label_names=label_names,
            max_length=max_length,
            method=trainable.adapter,
            base=trainable.base,
            extra_metadata=metadata,
        )
    return save_classifier(
        trainable.model,
        trainable.tokenizer,
        out_dir,
        label_names=label_names,
        max_length=max_length,
        extra_metadata=metadata,
    )
