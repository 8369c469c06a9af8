"""Our fp32 classifier behind Hugging Face's ``pipeline("text-classification")``: the baseline of the benchmark.

Why an adapter and not an export: our head mean-pools the encoder's tokens, while
``BertForSequenceClassification`` classifies the pooled [CLS] token, so a folder written in
that format would be a different model. Instead, :class:`MeanPoolForSequenceClassification`
is a ``PreTrainedModel`` that holds *the same* ``TextClassifier`` modules and returns
``SequenceClassifierOutput(logits=...)``; the pipeline then does what it does for any
Hugging Face classifier — its own tokenization, padding, batching, softmax and label
mapping — and the benchmark checks that its answers equal ours.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from domainflow.modeling import TextClassifier, load_classifier


class MeanPoolForSequenceClassification(PreTrainedModel):
    """A ``TextClassifier`` presented as a Hugging Face sequence classifier (same modules, same weights)."""

    base_model_prefix = "classifier"
    _supports_sdpa = True  # the wrapped encoder already runs with its own attention implementation

    def __init__(self, classifier: TextClassifier) -> None:
        # PreTrainedModel.__init__ rewrites attention settings on the config it receives; a copy
        # keeps the wrapped encoder's own config exactly as loaded.
        super().__init__(copy.deepcopy(classifier.config))
        self.classifier = classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[
            "logits"
        ]
        return SequenceClassifierOutput(logits=logits)


def text_classification_pipeline(model_dir: str | Path) -> Any:
    """``pipeline("text-classification")`` over the fp32 model in ``model_dir``.

    Call it as a user would: ``pipe(texts, batch_size=32, truncation=True, max_length=...)``
    for a batch job, ``pipe(text)`` per request. A compressed candidate is refused: the
    baseline is the uncompressed model a user would otherwise deploy.
    """
    from transformers import pipeline

    loaded = load_classifier(model_dir, apply_compression=False)
    if not isinstance(loaded.model, TextClassifier) or loaded.metadata.get("compression"):
        raise ValueError(
            f"{model_dir} is a compressed candidate ({loaded.metadata.get('compression')}); the pipeline baseline "
            "needs an fp32 model"
        )
    model = MeanPoolForSequenceClassification(loaded.model).eval()
    model.config.id2label = dict(enumerate(loaded.label_names))
    model.config.label2id = {name: i for i, name in enumerate(loaded.label_names)}
    # The pipeline logs an ERROR for any class missing from its list of known classifiers (a
    # name check) and then works as usual; the adapter is knowingly not on that list.
    check = logging.getLogger("transformers.pipelines.base")
    level = check.level
    check.setLevel(logging.CRITICAL)
    try:
        return pipeline("text-classification", model=model, tokenizer=loaded.tokenizer, device="cpu")
    finally:
        check.setLevel(level)
