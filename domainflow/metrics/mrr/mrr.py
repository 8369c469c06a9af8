"""MRR as a local `evaluate` module: mean of 1 / rank of each user's held-out item (full list, no cut-off).

Input: ``predictions`` = the 1-based rank of each user's held-out item among that user's candidates.
"""

import datasets
import evaluate
import numpy as np


class Mrr(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: 1-based rank (int) of the held-out item per user",
            features=datasets.Features({"predictions": datasets.Value("int64")}),
        )

    def _compute(self, predictions):
        ranks = np.asarray(predictions, dtype=float)
        if ranks.size == 0:
            raise ValueError("mrr of an empty set is undefined")
        if (ranks < 1).any():
            raise ValueError("ranks are 1-based; got a rank < 1")
        return {"mrr": float((1.0 / ranks).mean())}
