"""Small records the ranking tasks exchange (paths, fingerprints, a few numbers; JSON-persisted).

Models cross task boundaries as :class:`domainflow.records.ModelRef` (a bundle or encoder
directory) and measurements as :class:`domainflow.records.Evaluation`, as in the text pipeline.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class RankingDatasetRef(BaseModel):
    """A split ranking dataset folder (see :mod:`domainflow.recsys.dataset`)."""

    domain: str
    path: str
    fingerprint: str = Field(description="content hash of the source files, the user sample and the protocol")
    test_fingerprint: str = Field(
        description="hash of the evaluated users' histories and held-out items: champion and challenger must share it"
    )
    num_users: int
    num_items: int
    num_interactions: int
    evaluated_users: int
    fit_users: int = Field(description="users with a fit target for the ranker (their last train positive)")
    cold_items: int = Field(0, description="cold-start protocol: items kept out of train (0: standard protocol)")


class BaselinesRef(BaseModel):
    """Popularity counts and the BPR factors, trained on the train split (``baselines.safetensors``)."""

    path: str
    fingerprint: str
    bpr_best_epoch: int
    bpr_valid_curve: list[tuple[int, float]]
    train_seconds: dict[str, float]
