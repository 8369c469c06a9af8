"""Recall of each class as a local `evaluate` module: keys ``recall_<class id>``.

Why per class: on imbalanced data a good macro average can hide one class that the
model keeps missing, and some misses cost more than others (a bearish headline read
as neutral is the costly error of finance_sentiment). One key per class id lets a
domain put a floor on the class that matters (``QualityGates.min_metrics``).

Keys carry class ids, not names, because an `evaluate` module sees integer ids only;
a domain maps the name it cares about to its key (``f"recall_{label_names.index(name)}"``).
Only classes present in the references get a key: recall of a class with no examples
is undefined, and reporting 0 would fail a floor for a reason that is not the model's.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Per-class recall (true positives / examples of the class), one key per class id present in the references."
)


class PerClassRecall(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions and references: integer class ids of equal length",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.size == 0:
            raise ValueError("recall of an empty set is undefined")
        scores = {}
        for label in np.unique(references):
            of_label = references == label
            scores[f"recall_{int(label)}"] = float(np.mean(predictions[of_label] == label))
        return scores
