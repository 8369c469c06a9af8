"""Classifier folders that Hugging Face transformers loads as they are, through a registered model type.

After ``import domainflow``, an fp32 classifier folder written by the pipeline (the linear probe,
the fine-tuned candidate, a pruned or distilled one: the champion's fp32 parent) loads with::

    import domainflow  # registers the model type (lazily, see domainflow/__init__.py)
    from transformers import AutoModelForSequenceClassification, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    classify = pipeline("text-classification", model=folder)
    classify(texts, truncation=True, max_length=64)  # the domain's max_length, as domainflow truncates

No ``trust_remote_code``: nothing is downloaded or executed from the folder. The code is this
package's, registered with ``AutoConfig.register`` / ``AutoModelForSequenceClassification.register``.

Why a model type of our own: our head mean-pools the encoder's tokens, while
``BertForSequenceClassification`` classifies the pooled [CLS] token, so declaring the folder a
``bert`` classifier would give a different model (worse: ``from_pretrained`` would load it with a
randomly initialised head and encoder and only warn).

Why the folder is written in this format directly (one format, not an export step): both readers
use the same two files. ``config.json`` is the encoder's own config, flat as before (so code and
people reading ``num_hidden_layers`` or ``intermediate_size`` from it keep working), with
``model_type`` set to :data:`MODEL_TYPE`, the encoder's type kept in ``encoder_model_type``, and
``id2label``/``label2id``; ``model.safetensors`` holds ``encoder.*`` and ``classifier.*``, the
parameter names of both :class:`~domainflow.modeling.TextClassifier` and
:class:`~domainflow.hf_pipeline.MeanPoolForSequenceClassification`. An export step would store a
second copy of every weight per candidate and per registry version, and two copies can drift.
Folders written before (``domainflow.json`` format 1, ``config.json`` of ``model_type`` ``bert``)
still load with :func:`domainflow.modeling.load_classifier`; :func:`export_for_transformers` writes
such a folder anew in this format.

What transformers cannot load, and refuses with a message that says why:

* an ``onnx_int8`` candidate holds an ONNX Runtime graph (``model.int8.onnx``) and no weights
  transformers can read; load its fp32 parent, or the folder with domainflow / ONNX Runtime;
* a ``dynamic_int8`` candidate stores its parent's fp32 weights and is re-quantized by domainflow
  at load time; transformers would run the fp32 weights, a different model from the one evaluated.
* a parameter-efficient candidate (LoRA, IA3) holds an adapter and a head for a base encoder stored
  elsewhere; :func:`export_for_transformers` writes a copy with the adapter merged that transformers loads.

This module imports only transformers' configuration machinery (which the auto classes have
already imported when the hook in ``domainflow/__init__.py`` calls it); the model class, which
needs ``transformers.modeling_utils``, lives in :mod:`domainflow.hf_pipeline` and is registered
when the first config of this type is made (see :func:`register_model`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig

MODEL_TYPE = "domainflow_mean_pool"
ARCHITECTURE = "MeanPoolForSequenceClassification"
METADATA_FILE = "domainflow.json"  # the same name as domainflow.modeling.METADATA_FILE (not imported: torch)
ONNX_RECIPES = ("onnx_int8",)  # the same as domainflow.compression.ONNX_RECIPES (not imported: torch)
ADAPTER_KEY = "adapter"  # the same as domainflow.peft_models.ADAPTER_KEY (not imported: torch)
# Keys of the classifier's config.json that describe the classifier, not the encoder.
_CLASSIFIER_KEYS = ("model_type", "encoder_model_type", "architectures", "transformers_version", "_name_or_path")


class MeanPoolClassifierConfig(PreTrainedConfig):
    """The config of a mean-pooled linear classifier: the encoder's config fields, flat, plus its type.

    Every field of the encoder's config (``hidden_size``, ``num_hidden_layers``, …) is kept as an
    attribute, as ``PreTrainedConfig`` keeps unknown keyword arguments.
    """

    model_type = MODEL_TYPE
    encoder_model_type: str = "bert"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        register_model()  # see register_model: the first config of this type is when transformers may need it

    def encoder_config(self) -> PreTrainedConfig:
        """The encoder's own config (``BertConfig`` for MiniLM), to build the encoder from."""
        return encoder_config_from_fields(self.to_dict())


def encoder_config_from_fields(fields: dict[str, Any]) -> PreTrainedConfig:
    """The encoder's config out of a classifier ``config.json``'s fields (format 2: flat, typed by
    ``encoder_model_type``)."""
    encoder_type = fields.get("encoder_model_type")
    if not encoder_type:
        raise ValueError(f"a {MODEL_TYPE} config names no encoder_model_type")
    rest = {key: value for key, value in fields.items() if key not in _CLASSIFIER_KEYS}
    return AutoConfig.for_model(encoder_type, **rest)


def classifier_config(encoder_config: PreTrainedConfig, label_names: Sequence[str]) -> MeanPoolClassifierConfig:
    """The ``config.json`` of a classifier over ``label_names`` built on an encoder with ``encoder_config``."""
    fields = {key: value for key, value in encoder_config.to_dict().items() if key not in _CLASSIFIER_KEYS}
    fields.update(
        {
            "encoder_model_type": encoder_config.model_type,
            "architectures": [ARCHITECTURE],
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
            "problem_type": "single_label_classification",
        }
    )
    return MeanPoolClassifierConfig(**fields)


def encoder_config_of(model_dir: str | Path) -> PreTrainedConfig:
    """The encoder's config of a classifier folder of either format (format 1's config.json is the
    encoder's own config; format 2's is :class:`MeanPoolClassifierConfig`)."""
    fields = json.loads((Path(model_dir) / "config.json").read_text())
    if fields.get("model_type") == MODEL_TYPE:
        return encoder_config_from_fields(fields)
    return AutoConfig.from_pretrained(model_dir)


def is_transformers_folder(model_dir: str | Path) -> bool:
    """Whether ``config.json`` declares the registered model type (format 2; format 1 declares the encoder's)."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def check_transformers_loadable(model_dir: str | Path) -> None:
    """Raise a ``ValueError`` that says why, for a domainflow folder transformers must not load.

    A path that is not a local domainflow folder (a hub name, another tool's folder) passes: it is
    transformers' own errors that apply there.
    """
    path = Path(model_dir)
    metadata_file = path / METADATA_FILE
    if not metadata_file.is_file():
        return
    metadata = json.loads(metadata_file.read_text())
    recipe = metadata.get("compression")
    parent = metadata.get("parent")
    if recipe in ONNX_RECIPES or metadata.get("onnx_file"):
        raise ValueError(
            f"{path} is an ONNX int8 candidate ({recipe}): it holds an ONNX Runtime graph "
            f"({metadata.get('onnx_file', 'model.int8.onnx')}), not weights transformers can load. Load its fp32 "
            f"parent {parent!r} with transformers, or this folder with domainflow.modeling.load_classifier "
            "(which runs the graph in ONNX Runtime)"
        )
    if recipe:
        raise ValueError(
            f"{path} is a {recipe} candidate: it stores the fp32 weights of its parent {parent!r} and domainflow "
            "quantizes them when it loads the folder, so transformers would run a different model from the one "
            "evaluated. Load the fp32 parent with transformers, or this folder with domainflow.modeling.load_classifier"
        )
    adapter = metadata.get(ADAPTER_KEY)
    if isinstance(adapter, dict):
        raise ValueError(
            f"{path} is a parameter-efficient candidate: it holds a {adapter.get('kind')} adapter and a head for the "
            f"base encoder {adapter.get('base', {}).get('path')!r}, not a whole model. Write a copy with the adapter "
            "merged that transformers loads with domainflow.hf_export.export_for_transformers, or load the folder "
            "with domainflow.modeling.load_classifier"
        )
    if not is_transformers_folder(path):
        raise ValueError(
            f"{path} was written before domainflow classifier folders carried the model type {MODEL_TYPE!r} "
            "(its config.json declares the bare encoder, which transformers would fit with a different, randomly "
            "initialised head); write a loadable copy with domainflow.hf_export.export_for_transformers"
        )


def export_for_transformers(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of an fp32 classifier folder that transformers loads (for folders written in format 1).

    Folders written now are already loadable: they need no export. Compressed candidates are
    refused as in :func:`check_transformers_loadable`.
    """
    from domainflow.modeling import load_classifier, save_classifier

    metadata = json.loads((Path(model_dir) / METADATA_FILE).read_text())
    if metadata.get("compression"):
        check_transformers_loadable(model_dir)  # raises, saying why
    loaded = load_classifier(model_dir, apply_compression=False)
    # an adapter folder is written whole, its adapter merged (load_classifier merges it): no adapter entry is kept
    dropped = {"format_version", "label_names", "max_length", ADAPTER_KEY}
    kept = {k: v for k, v in metadata.items() if k not in dropped}
    return save_classifier(
        loaded.torch_model,
        loaded.tokenizer,
        out_dir,
        label_names=loaded.label_names,
        max_length=loaded.max_length,
        extra_metadata=kept,
    )


def register_config() -> None:
    """``AutoConfig`` knows :data:`MODEL_TYPE` (cheap once transformers' configuration code is imported)."""
    AutoConfig.register(MODEL_TYPE, MeanPoolClassifierConfig, exist_ok=True)


_model_registered = False


def register_model() -> None:
    """``AutoModelForSequenceClassification`` (and so ``pipeline``) builds
    :class:`~domainflow.hf_pipeline.MeanPoolForSequenceClassification` for :data:`MODEL_TYPE`.

    Called when the first :class:`MeanPoolClassifierConfig` is made: the auto classes look a model
    class up by the type of a config they have loaded, so none can need ours before then. It needs
    ``transformers.modeling_utils`` (~3 s to import on 2 cores); registering it any earlier would make
    every process that merely tokenizes (an ONNX model's server) import it, because importing any
    transformers config class imports ``modeling_auto`` (for its docstrings). A transformers without
    torch has no models to register: the config stays usable.
    """
    global _model_registered
    if _model_registered:
        return
    try:
        from transformers.models.auto.modeling_auto import AutoModelForSequenceClassification

        from domainflow.hf_pipeline import MeanPoolForSequenceClassification
    except ImportError:  # no torch: transformers can read configs and tokenizers, not build models
        return
    _model_registered = True
    AutoModelForSequenceClassification.register(
        MeanPoolClassifierConfig, MeanPoolForSequenceClassification, exist_ok=True
    )


def register() -> None:
    """Both registrations now (importing this module does the first, and the first config of this type does
    the second: nobody needs to call this, but it says what is registered)."""
    register_config()
    register_model()


# Importing this module registers the config: `import domainflow` imports it once transformers' auto classes are.
register_config()
