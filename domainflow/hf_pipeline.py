"""Our fp32 classifier as a Hugging Face model: the class transformers builds for our folders, and
the benchmark's ``pipeline("text-classification")`` baseline.

Why a class of our own and not ``BertForSequenceClassification``: our head mean-pools the encoder's
tokens, while ``BertForSequenceClassification`` classifies the pooled [CLS] token, so a folder
declared as that class would be a different model. :class:`MeanPoolForSequenceClassification` is
a ``PreTrainedModel`` with the same modules under the same names as
:class:`~domainflow.modeling.TextClassifier` (``encoder``, ``dropout``, ``classifier``), so it reads
the same ``model.safetensors`` and computes the same logits; :mod:`domainflow.hf_export` registers
it for the folders' model type. The pipeline then does what it does for any Hugging Face
classifier — its own tokenization, padding, batching, softmax and label mapping — and the
benchmark and tests check that its answers equal ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from domainflow.hf_export import MeanPoolClassifierConfig, check_transformers_loadable, classifier_config
from domainflow.modeling import TextClassifier, encoder_from_config, load_classifier, mean_pool, read_metadata


class MeanPoolForSequenceClassification(PreTrainedModel):
    """Encoder → mean pooling → dropout → linear layer: a ``TextClassifier`` as transformers sees it."""

    config_class = MeanPoolClassifierConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    _supports_sdpa = True  # the encoder is built with its own default attention implementation

    def __init__(self, config: MeanPoolClassifierConfig) -> None:
        super().__init__(config)
        self.encoder = encoder_from_config(config.encoder_config())
        self.dropout = nn.Dropout(0.1)  # TextClassifier's default; only active in training
        self.classifier = nn.Linear(config.hidden_size, int(config.num_labels or 0))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """As ``PreTrainedModel.from_pretrained``, but a compressed domainflow candidate is refused with
        the reason (an ONNX graph has no weights to load; a torch int8 one would load as its fp32 parent)."""
        if pretrained_model_name_or_path is not None:
            check_transformers_loadable(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_text_classifier(cls, model: TextClassifier, label_names: list[str]) -> MeanPoolForSequenceClassification:
        """The same weights in this class (a copy), for a model already loaded by domainflow."""
        wrapped = cls(classifier_config(model.encoder.config, label_names))
        wrapped.load_state_dict(model.state_dict())
        return wrapped.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        """Logits as ``TextClassifier.forward`` computes them; a cross-entropy loss when labels are given
        (so the Trainer can fine-tune the model further)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def text_classification_pipeline(model_dir: str | Path) -> Any:
    """``pipeline("text-classification")`` over the fp32 model in ``model_dir``.

    Call it as a user would: ``pipe(texts, batch_size=32, truncation=True, max_length=...)``
    for a batch job, ``pipe(text)`` per request. A compressed candidate is refused: the
    baseline is the uncompressed model a user would otherwise deploy. A folder of the current
    format is loaded by transformers itself (``pipeline(model=folder)``); one written before
    (format 1) is loaded by domainflow and its weights handed to the same class.
    """
    from transformers import pipeline

    from domainflow.hf_export import ADAPTER_KEY, is_transformers_folder, register

    metadata = read_metadata(model_dir)
    recipe = metadata.get("compression")
    if recipe:
        raise ValueError(f"{model_dir} is a compressed candidate ({recipe}); the pipeline baseline needs an fp32 model")
    register()  # already done by `import domainflow` once transformers' auto classes load; explicit here
    if is_transformers_folder(model_dir) and ADAPTER_KEY not in metadata:  # an adapter folder: merged by domainflow
        return pipeline("text-classification", model=str(model_dir), device="cpu")
    loaded = load_classifier(model_dir)
    model = MeanPoolForSequenceClassification.from_text_classifier(loaded.torch_model, loaded.label_names)
    return pipeline("text-classification", model=model, tokenizer=loaded.tokenizer, device="cpu")
