"""NDCG@10 as a local `evaluate` module, for one relevant item per user.

With a single relevant item the ideal DCG is 1, so a user's NDCG@10 is ``1 / log2(rank + 1)``
when the held-out item is ranked in the top 10, and 0 otherwise. Input: ``predictions`` = the
1-based rank of each user's held-out item among that user's candidates.
"""

import datasets
import evaluate
import numpy as np

K = 10


class NdcgAt10(evaluate.Metric):
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
            raise ValueError("ndcg_at_10 of an empty set is undefined")
        if (ranks < 1).any():
            raise ValueError("ranks are 1-based; got a rank < 1")
        gains = np.where(ranks <= K, 1.0 / np.log2(ranks + 1.0), 0.0)
        return {"ndcg_at_10": float(gains.mean())}
