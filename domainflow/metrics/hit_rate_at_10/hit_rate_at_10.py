"""HR@10 as a local `evaluate` module: share of held-out items ranked in the top 10.

Input: ``predictions`` = the 1-based rank of each user's held-out item among that user's
candidates (1 = ranked first). One held-out item per user (leave-last-out), so HR@10 is
also recall@10.
"""

import datasets
import evaluate
import numpy as np

K = 10


class HitRateAt10(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: 1-based rank (int) of the held-out item per user",
            features=datasets.Features({"predictions": datasets.Value("int64")}),
        )

    def _compute(self, predictions):
        ranks = np.asarray(predictions)
        if ranks.size == 0:
            raise ValueError("hit_rate_at_10 of an empty set is undefined")
        if (ranks < 1).any():
            raise ValueError("ranks are 1-based; got a rank < 1")
        return {"hit_rate_at_10": float((ranks <= K).mean())}
