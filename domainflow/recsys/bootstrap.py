"""Confidence intervals over users for ranking metrics, from the held-out item's rank per user.

Why a bootstrap over users: every ranking metric here is a mean over evaluated users of a per-user
value (HR@10, NDCG@10 and MRR of one held-out item), and two models scored on the same users are
*paired*: user by user, their differences vary much less than either metric does. Resampling users
with replacement (the same resample for both models) gives an interval for the mean difference
that accounts for that pairing, with no assumption about the metric's distribution (NDCG@10 per
user is 0 for most users and a few discrete values for the rest).

A comparison whose interval excludes 0 is a ``win`` or a ``loss``; one whose interval includes 0
is a ``tie``, however large its point estimate: with ~900 users a gap of 0.006 NDCG@10 can be
noise. The percentile interval is used (the resampled means' quantiles), with a fixed seed so a
decision can be recomputed exactly from the stored ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("hit_rate_at_10", "ndcg_at_10", "mrr")
RESAMPLES = 2000
CONFIDENCE = 0.95


def per_user(ranks: Sequence[int] | np.ndarray, metric: str, k: int = 10) -> np.ndarray:
    """Each user's value of ``metric`` from the 1-based rank of their held-out item (the same
    definitions as the project's ``evaluate`` modules: their mean is the reported metric)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or (ranks < 1).any():
        raise ValueError("ranks must be a 1-D sequence of 1-based ranks")
    if metric == "hit_rate_at_10":
        return (ranks <= k).astype(np.float64)
    if metric == "ndcg_at_10":
        return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    if metric == "mrr":
        return 1.0 / ranks
    raise ValueError(f"unknown ranking metric {metric!r}; expected one of {METRICS}")


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def verdict(self) -> str:
        """For a difference (a − b): ``win`` when the interval is above 0, ``loss`` below, else ``tie``."""
        if self.low > 0:
            return "win"
        if self.high < 0:
            return "loss"
        return "tie"

    def text(self, digits: int = 4) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "confidence": self.confidence}


def _resample_means(values: np.ndarray, resamples: int, seed: int, chunk: int = 500) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of the rows of ``values`` (users), in chunks
    so that memory stays at ``chunk x users`` indices."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(size, n))
        means[start : start + size] = values[picks].mean(axis=1)
    return means


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """The mean of per-user ``values`` with its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("values must be a non-empty 1-D sequence (one value per user)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    means = _resample_means(values, resamples, seed)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(values.mean()), float(low), float(high), confidence)


def paired_difference(
    ranks_a: Sequence[int] | np.ndarray,
    ranks_b: Sequence[int] | np.ndarray,
    metric: str = "ndcg_at_10",
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Mean of ``metric(a) − metric(b)`` over users, with a paired bootstrap interval.

    ``ranks_a[i]`` and ``ranks_b[i]`` must be the same user's held-out item ranked by two models:
    a different length means the two were not evaluated on the same users, which is refused.
    """
    a, b = np.asarray(ranks_a), np.asarray(ranks_b)
    if a.shape != b.shape:
        raise ValueError(f"paired ranks must cover the same users: {a.shape[0]} vs {b.shape[0]} ranks")
    difference = per_user(a, metric) - per_user(b, metric)
    return bootstrap_mean(difference, resamples=resamples, confidence=confidence, seed=seed)
