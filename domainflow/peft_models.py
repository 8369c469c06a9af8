"""Parameter-efficient candidates (LoRA, IA3): a frozen base encoder, a small trained adapter and the head.

Why: a full fine-tune rewrites all 22M weights of MiniLM, so every domain's model is a 90 MB copy of its own.
With an adapter the encoder's weights stay those of the pretrained base; what training learns is a low-rank
update (LoRA: ``W + B·A·alpha/r``) or a rescaling of some activations (IA3), a few hundred kilobytes, plus the
head. Training goes through the same Trainer recipe as the full fine-tune (``tasks.finetune``), from the same
linear probe.

A candidate folder holds what it adds and the name of what it needs::

    adapter/adapter_config.json       peft's own format: PeftModel.from_pretrained reads this folder
    adapter/adapter_model.safetensors
    head.safetensors                  the linear head (classifier.weight, classifier.bias)
    config.json, tokenizer files      as in every classifier folder
    domainflow.json                   the "adapter" entry: method, settings, and the base encoder's path,
                                      layer count and fingerprint (a digest of its weights)

:func:`domainflow.modeling.load_classifier` dispatches on that entry (as it does on ``fusion``): the base is
loaded from its path, its weights' fingerprint checked against the recorded one (an adapter applied to other
weights computes something nobody evaluated, so a mismatch is refused naming both), the adapter applied and, by
default, merged into the weights (peft's ``merge_and_unload``): the served model is then an ordinary
``TextClassifier``, exactly as fast as a full fine-tune and free to be pruned, distilled or exported to ONNX.
``merge_adapter=False`` keeps the adapter separate (the trained form). ``share_base=True`` (what ``domainflow
serve`` does by default) keeps it separate on a base loaded once for every model of the process that names it:
see :mod:`domainflow.shared_bases`.

``peft`` is an optional extra (``pip install -e '.[peft]'``): nothing here imports it until an adapter is
trained or loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from domainflow.modeling import (
    TextClassifier,
    classifier_metadata,
    directory_size,
    load_encoder,
    read_metadata,
    write_classifier_files,
    write_metadata,
)
from domainflow.spec import AdapterKind, PeftSettings

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn

ADAPTER_KEY = "adapter"  # the metadata entry (domainflow.json) that makes a folder a PEFT candidate
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name: PeftModel.from_pretrained looks for it
HEAD_FILE = "head.safetensors"
MERGED_KEY = "merged_adapter"  # kept in the metadata of a folder whose weights have an adapter merged in


class AdapterError(ValueError):
    """An adapter folder that cannot be applied: its base encoder is missing or is not the one it was trained on."""


class AdapterMethod(BaseModel):
    """One adapter to train, with every setting its weights depend on (a task input: part of the cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: AdapterKind
    learning_rate: float
    epochs: float | None = None
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    feedforward_modules: tuple[str, ...] = ()

    def peft_config(self) -> PeftConfig:
        """The peft library's config for this method."""
        require_peft()
        from peft import IA3Config, LoraConfig

        if self.kind == "lora":
            return LoraConfig(
                r=self.rank,
                lora_alpha=self.alpha,
                lora_dropout=self.dropout,
                target_modules=list(self.target_modules),
                bias="none",
            )
        return IA3Config(target_modules=list(self.target_modules), feedforward_modules=list(self.feedforward_modules))


#: Where each method's settings live in the domain's ``[peft]`` table: AdapterMethod field -> PeftSettings key.
SETTINGS_KEYS: dict[str, dict[str, str]] = {
    "lora": {
        "learning_rate": "lora_lr",
        "rank": "lora_rank",
        "alpha": "lora_alpha",
        "dropout": "lora_dropout",
        "target_modules": "target_modules",
    },
    "ia3": {
        "learning_rate": "ia3_lr",
        "target_modules": "ia3_target_modules",
        "feedforward_modules": "ia3_feedforward_modules",
    },
}


def adapter_methods(settings: PeftSettings) -> list[AdapterMethod]:
    """The domain's ``[peft]`` table as one method record per adapter it asks for, in its order. Each record
    holds only its own method's settings, so changing IA3's learning rate does not retrain the LoRA candidate."""
    return [
        AdapterMethod(
            kind=kind,
            epochs=settings.epochs,
            **{field: getattr(settings, key) for field, key in SETTINGS_KEYS[kind].items()},
        )
        for kind in settings.methods
    ]


def require_peft() -> None:
    """Fail before any work, saying how to install the optional ``peft`` extra."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "parameter-efficient candidates need the peft library: pip install -e '.[peft]' "
            "(or remove the methods of the domain's [peft] table)"
        ) from exc


class BaseEncoder(BaseModel):
    """The pretrained encoder an adapter applies to: where it is, how many layers of it, and its fingerprint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    num_layers: int | None = None
    fingerprint: str

    def describe(self) -> str:
        layers = f", first {self.num_layers} layers" if self.num_layers is not None else ""
        return f"{self.path}{layers}"


def _adapter_prefix(encoder: nn.Module) -> str | None:
    """The name prefix of an adapter's own parameters (``lora_``, ``ia3_``) when ``encoder`` is a PeftModel."""
    tuner = getattr(encoder, "base_model", None)
    prefix = getattr(tuner, "prefix", None)
    return prefix if isinstance(prefix, str) else None


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A digest of the encoder's base weights (parameter names and fp32 bytes, in name order).

    For an encoder with an adapter (a PeftModel) it is the digest of the weights under the adapter, the
    adapter's own parameters left out and peft's ``base_layer`` renaming undone, so an encoder has the same
    fingerprint before an adapter is attached, during training and after: comparing the two checks that the
    base stayed frozen. A merged encoder's weights have changed, and so has its fingerprint.
    """
    prefix = _adapter_prefix(encoder)
    module = encoder.get_base_model() if prefix is not None else encoder  # type: ignore[operator]
    digest = hashlib.sha256()
    named = []
    for name, parameter in module.named_parameters():
        if prefix is not None and prefix in name:
            continue
        named.append((name.replace(".base_layer.", "."), parameter))
    for name, parameter in sorted(named, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_base_encoder(base: BaseEncoder, *, needed_by: str) -> nn.Module:
    """The base encoder from its path, refused when its weights' fingerprint is not the recorded one."""
    if not Path(base.path).exists() and Path(base.path).is_absolute():
        raise AdapterError(
            f"{needed_by}: its adapter applies to the base encoder {base.describe()}, which does not exist here; "
            "restore that folder (the adapter is useless without it) or retrain the candidate"
        )
    encoder, _ = load_encoder(base.path, base.num_layers)
    found = encoder_fingerprint(encoder)
    if found != base.fingerprint:
        raise AdapterError(
            f"{needed_by}: its adapter was trained on the base encoder {base.describe()} with fingerprint "
            f"{base.fingerprint}, but the encoder there now has fingerprint {found}; an adapter applied to other "
            "weights is not the model that was evaluated. Restore that base encoder or retrain the candidate"
        )
    return encoder


def attach_adapter(
    model: TextClassifier, method: AdapterMethod, base_model: str, num_layers: int | None
) -> BaseEncoder:
    """Freeze ``model``'s encoder and wrap it with the method's adapter (the head stays trainable); return the base.

    The encoder must be the pretrained base itself (as in the linear probe): an adapter folder names its base
    by path, so an init whose encoder was already trained would be saved as an adapter on weights that
    nowhere exist on disk. That is checked here, before any training.
    """
    require_peft()
    from peft import get_peft_model

    fingerprint = encoder_fingerprint(model.encoder)
    base = BaseEncoder(path=base_model, num_layers=num_layers, fingerprint=fingerprint)
    reference = encoder_fingerprint(load_encoder(base_model, num_layers)[0])
    if reference != fingerprint:
        raise AdapterError(
            f"an adapter trains on a pretrained encoder, but the model to start from has encoder weights "
            f"(fingerprint {fingerprint}) other than the base {base.describe()} (fingerprint {reference}); "
            "start from the linear probe"
        )
    wrapped: Any = get_peft_model(model.encoder, method.peft_config())  # a PeftModel stands in for the encoder
    model.encoder = wrapped
    for parameter in model.classifier.parameters():
        parameter.requires_grad_(True)
    return base


def save_adapter_classifier(
    model: TextClassifier,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    label_names: list[str],
    max_length: int,
    method: AdapterMethod,
    base: BaseEncoder,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT candidate's folder (see the module docstring): the adapter, the head and the base's name.

    Refuses when the model's base weights are no longer the base's (they must have stayed frozen): the folder
    would otherwise describe a model that loading cannot rebuild.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    encoder: Any = model.encoder
    found = encoder_fingerprint(encoder)
    if found != base.fingerprint:
        raise AdapterError(
            f"the base weights changed during training (fingerprint {base.fingerprint} -> {found}): "
            "they must stay frozen for the adapter to apply to the base on disk"
        )
    out_dir = Path(out_dir)
    adapter_dir = out_dir / ADAPTER_DIR
    adapter_dir.mkdir(parents=True, exist_ok=True)
    encoder.peft_config["default"].save_pretrained(str(adapter_dir))
    adapter_state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(encoder).items()}
    save_file(adapter_state, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    head = {k: v.detach().contiguous().cpu() for k, v in model.classifier.state_dict().items()}
    save_file(head, str(out_dir / HEAD_FILE), metadata={"format": "pt"})
    write_classifier_files(model.config, tokenizer, out_dir, label_names)
    entry = {
        "kind": method.kind,
        "method": method.model_dump(mode="json"),
        "base": base.model_dump(mode="json"),
        "adapter_dir": ADAPTER_DIR,
        "head_file": HEAD_FILE,
        "adapter_bytes": directory_size(adapter_dir) + (out_dir / HEAD_FILE).stat().st_size,
    }
    metadata = classifier_metadata(label_names, max_length)
    metadata.update(extra_metadata or {})
    metadata[ADAPTER_KEY] = entry
    write_metadata(out_dir, metadata)
    return out_dir


def load_adapter_classifier(
    model_dir: Path, metadata: dict[str, Any], *, merge: bool = True, share_base: bool = False
) -> TextClassifier:
    """The classifier a PEFT folder describes, in eval mode: its base (checked), its adapter (merged into the
    base weights unless ``merge=False``) and its head.

    ``share_base=True`` takes the base from the process's cache (:mod:`domainflow.shared_bases`: loaded and
    checked once for every model on it) and keeps the adapter unmerged whatever ``merge`` says: merging writes
    into the base weights, which other models use too."""
    require_peft()
    from peft import PeftModel
    from safetensors.torch import load_file

    entry = metadata[ADAPTER_KEY]
    try:
        base = BaseEncoder.model_validate(entry["base"])
        adapter_dir, head_file = model_dir / entry["adapter_dir"], model_dir / entry["head_file"]
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{model_dir}: the adapter entry of its metadata is malformed ({exc})") from exc
    shared = None
    if share_base:
        from domainflow.shared_bases import SHARED_BASES

        shared = SHARED_BASES.get(base, needed_by=str(model_dir))
        base_encoder = shared.private_tree()
    else:
        base_encoder = load_base_encoder(base, needed_by=str(model_dir))
    encoder: Any = PeftModel.from_pretrained(base_encoder, str(adapter_dir))
    if merge and shared is None:
        encoder = encoder.merge_and_unload()
    model = TextClassifier(encoder, num_labels=len(metadata["label_names"]))
    model.classifier.load_state_dict(load_file(str(head_file)))
    model.shared_base = shared  # what keeps the base in the cache while this model lives (None: a copy of its own)
    return model.eval()


def adapter_bytes(metadata: dict[str, Any]) -> int | None:
    """Bytes a PEFT candidate adds to its base on disk (adapter + head); None for any other folder."""
    entry = metadata.get(ADAPTER_KEY)
    return int(entry["adapter_bytes"]) if isinstance(entry, dict) and "adapter_bytes" in entry else None


def write_merged_copy(model_dir: str | Path, out_dir: str | Path) -> Path:
    """An ordinary fp32 classifier folder with the adapter of ``model_dir`` merged into its base weights.

    What an int8 copy of a PEFT candidate is made from: the copy stands alone, needs no base on disk
    (transformers loads it too), and records what was merged under :data:`MERGED_KEY`. (Pruning merges in memory:
    ``load_classifier`` gives the merged model.)
    """
    from domainflow.hf_export import export_for_transformers

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    entry = read_metadata(model_dir)[ADAPTER_KEY]
    export_for_transformers(model_dir, out_dir)  # loads the folder, which merges the adapter, and saves it whole
    metadata = read_metadata(out_dir)
    metadata[MERGED_KEY] = merged_entry(entry)
    write_metadata(out_dir, metadata)
    return out_dir


def merged_entry(adapter: dict[str, Any]) -> dict[str, Any]:
    """The :data:`MERGED_KEY` entry of a folder whose weights have the adapter entry ``adapter`` merged in."""
    return {"kind": adapter["kind"], "base": adapter["base"], "adapter_bytes": adapter.get("adapter_bytes")}
