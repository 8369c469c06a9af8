"""The ranking kind's spec: the protocol's knobs and how item / history texts are written.

A ranking domain (MovieLens-100K by default, or a user's own ``interactions.*`` + ``items.*``
files) is ranked by a text model (two towers over item and history texts), compared with a
popularity and a BPR baseline, and fused by a ranker; see :mod:`domainflow.recsys`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from domainflow import settings
from domainflow.spec import DomainSpec, Record

if TYPE_CHECKING:
    import pandas as pd

PROTOCOL = (
    "Implicit feedback: rating >= {threshold} is positive. Per user, interactions ordered by (timestamp, the item's "
    "position in the catalogue file; for MovieLens the integer item id); "
    "last positive -> test, second-last positive -> validation, train = interactions before the validation item; "
    "users with < {min_positives} positives are not evaluated. Full ranking over all catalogue items the user has not "
    "interacted with in train (test also excludes the validation item); score ties broken by catalogue position. "
    "Metrics: HR@10, NDCG@10, MRR."
)
COLD_START = (
    " Cold-start protocol: {share:.0%} of the catalogue (drawn per popularity stratum, seed {seed}) are cold items: "
    "every interaction with them is removed from train, so no model, table or ranker row is built from them; "
    "validation and test targets that are cold items can be ranked only from their text (title, year, genres). "
    "Metrics are reported on all targets and on cold targets alone."
)


#: The gate's baselines (scored in tasks/rank_evaluate.py); a misspelt name fails when the domain file loads.
BaselineName = Literal["popularity", "bpr", "bpr_fold_in", "item_knn", "next_item"]


class TwoTowerDefaults(Record):
    """Two-tower fine-tuning on a 2-core CPU: one pass over a capped sample of (history, next item) pairs.

    One shared encoder reads both towers (mean pooling, L2-normalised; score = cosine / temperature);
    the other items of a batch are the negatives, with the logQ correction. Measured on ML-100K
    validation (2,000 pairs, 6 layers): NDCG@10 0.029 untrained, 0.021 after training without the
    correction (lr 5e-5), 0.040 with it (lr 1e-4). A step costs ~20-30 s on a shared 2-core machine.
    """

    epochs: float = Field(1.0, gt=0.0, description="passes over the sampled pairs")
    batch_size: int = Field(64, ge=2, description="pairs per step (the other items of a batch are the negatives)")
    learning_rate: float = Field(1e-4, gt=0.0, description="AdamW learning rate")
    temperature: float = Field(0.05, gt=0.0, description="softmax temperature over cosine scores")
    max_pairs: int = Field(2000, ge=1, description="cap on sampled (history, next item) pairs")
    pairs_per_user: int = Field(6, ge=1, description="cap on pairs taken from one user")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="share of steps warming the learning rate up")


class BprDefaults(Record):
    """BPR matrix factorisation: epochs picked by validation NDCG@10 (checked every ``eval_every``)."""

    dim: int = Field(64, ge=1, description="embedding size")
    epochs: int = Field(60, ge=1, description="most training epochs")
    eval_every: int = Field(5, ge=1, description="epochs between validation checks")
    learning_rate: float = Field(0.01, gt=0.0, description="Adam learning rate")
    weight_decay: float = Field(1e-5, ge=0.0, description="L2 on embeddings")
    batch_size: int = Field(2048, ge=1, description="triples per step")
    fold_in_reg: float = Field(1.0, ge=0.0, description="ridge strength when folding a new user's history in")


class RankingSpec(DomainSpec):
    """A ranking domain: interactions + item texts → a ranked list of items per user."""

    task_kind: str = Field("ranking", description="ranking")
    primary_metric: str = Field("ndcg_at_10", description="the metric gates and champion comparisons use")
    metrics: tuple[str, ...] = Field(("hit_rate_at_10", "ndcg_at_10", "mrr"), description="ranking metrics")
    label_column: str = Field("item_id", description="column holding the item id")
    positive_threshold: float | None = Field(
        4.0, description="rating at or above which an interaction is a positive (None: every interaction)"
    )
    min_positives: int = Field(3, ge=3, description="users with fewer positives are not evaluated")
    k: int = Field(10, ge=1, description="cut-off of the ranking metrics")
    history_items: int = Field(20, ge=1, description="most recent items the user tower reads")
    # 64 tokens hold the ~5 most recent items: on ML-100K validation the untrained MiniLM scored
    # NDCG@10 0.029 with 64 tokens vs 0.026 with 128, at half the encoding cost.
    history_max_length: int = Field(64, ge=8, description="tokens of a history text")
    item_max_length: int = Field(48, ge=8, description="tokens of an item text")
    interactions: str | None = Field(
        None, description="interactions file (user_id, item_id, timestamp[, rating]); with items"
    )
    items: str | None = Field(None, description="items file (item_id, title[, year, genres]); with interactions")
    dataset: str = Field("movielens-100k", description="the dataset used when no files are given (fetched at set-up)")
    two_tower: TwoTowerDefaults = Field(default_factory=TwoTowerDefaults, description="text model training")
    bpr: BprDefaults = Field(default_factory=BprDefaults, description="BPR baseline training")
    split_protocol: Literal["standard", "cold_start"] = Field(
        "standard",
        description="standard: leave-last-out; cold_start: the same, with a share of items never in any training "
        "table (their targets can only be ranked from text)",
    )
    cold_item_share: float = Field(
        0.2, gt=0.0, lt=1.0, description="cold_start: share of items held out of training, per popularity stratum"
    )
    cold_seed: int = Field(0, description="cold_start: seed of the cold-item draw (part of the protocol, not the run)")
    item_neighbours: int | None = Field(
        None,
        ge=1,
        description="most neighbours kept per item in the co-occurrence and transition tables (None: all; "
        "set it for a large catalogue, where the tables would otherwise grow with items squared)",
    )
    ranker_negatives: int = Field(30, ge=1, description="sampled negatives per positive when fitting the ranker")
    baselines: tuple[BaselineName, ...] = Field(
        ("popularity", "bpr", "bpr_fold_in", "item_knn", "next_item"),
        description="baselines the deployed ranker must beat outside the 95% paired bootstrap interval over users "
        "(popularity, bpr, bpr_fold_in: BPR with the whole history folded in, item_knn: co-occurrence with the "
        "last 5 items, next_item: what users watched next after the last 5 items)",
    )

    def source_files(self, data_dir: str | Path | None = None, *, quiet: bool = False) -> dict[str, Path]:
        """The interactions and items files: ``interactions.*`` + ``items.*`` in ``data_dir``, else the
        domain's own ``interactions``/``items`` files, else MovieLens-100K, fetched on first use."""
        from domainflow.recsys import data, movielens

        if data_dir is not None:
            return data.find_files(Path(data_dir))
        if self.interactions and self.items:
            base = Path(self.source.base_dir) if self.source.base_dir else settings.data_dir()
            return {"interactions": (base / self.interactions).resolve(), "items": (base / self.items).resolve()}
        fetched = movielens.fetch_movielens(quiet=quiet)
        return {"interactions": fetched / "ml-100k.inter", "items": fetched / "ml-100k.item"}

    def read_source(self, files: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
        """Raw interactions and items frames (validated later by ``domainflow.recsys.data.validate``)."""
        from domainflow.recsys import data, movielens

        if Path(files["interactions"]).suffix == ".inter":  # recbole's atomic files: MovieLens
            return movielens.load_frames(Path(files["interactions"]).parent)
        return (
            data.read_table(files["interactions"]),
            data.read_table(files["items"]),
            {k: str(v) for k, v in files.items()},
        )

    @property
    def protocol(self) -> str:
        text = PROTOCOL.format(threshold=self.positive_threshold, min_positives=self.min_positives)
        if self.split_protocol == "cold_start":
            text += COLD_START.format(share=self.cold_item_share, seed=self.cold_seed)
        return text

    @property
    def cold_start(self) -> bool:
        return self.split_protocol == "cold_start"

    def item_text(self, title: str, year: str = "", genres: str = "") -> str:
        """What the item tower reads: "Toy Story (1995). Animation, Children's, Comedy"."""
        text = f"{title} ({year})" if year else title
        kinds = ", ".join(g for g in genres.split("|") if g)
        return f"{text}. {kinds}" if kinds else text

    def history_text(self, item_texts: Sequence[str]) -> str:
        """What the user tower reads: the most recent items first, so truncation drops the oldest."""
        recent = list(item_texts)[-self.history_items :][::-1]
        return " | ".join(recent)
