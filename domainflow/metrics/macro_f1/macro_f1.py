"""Macro-averaged F1 as a local `evaluate` module.

Averaged over the classes that occur in the references or the predictions, so a
class the model never predicts still counts (with F1 0) — the failure mode that
collapsed models show and plain accuracy hides on imbalanced data.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Unweighted mean of per-class F1 over the classes present in references or predictions."


class MacroF1(evaluate.Metric):
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
            raise ValueError("macro-F1 of an empty set is undefined")
        scores = []
        for label in np.union1d(predictions, references):
            true_positive = np.sum((predictions == label) & (references == label))
            predicted = np.sum(predictions == label)
            actual = np.sum(references == label)
            denominator = predicted + actual
            scores.append(0.0 if denominator == 0 else 2.0 * true_positive / denominator)
        return {"macro_f1": float(np.mean(scores))}
