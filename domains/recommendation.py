"""recommendation: rank movies for a user from their history (MovieLens-100K, or your own files).

The declared protocol (also written into every model card), see ``domainflow.recsys.protocol``:

* implicit feedback — a rating >= 4 (of 5) is a positive; lower ratings are interactions that
  are excluded from a user's candidates but are not positives;
* per-user chronological leave-last-out — last positive → test, second-last → validation, train =
  everything the user did before the validation item; users with < 3 positives are not evaluated;
* full ranking over every catalogue item the user has not interacted with in train (for test,
  the validation item is excluded too);
* HR@10, NDCG@10 (primary) and MRR.

Importing this module reads no data: MovieLens is fetched and read only when a run needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from domains.base import DataSource, DomainSpec, QualityGates, register

if TYPE_CHECKING:
    import pandas as pd

PROTOCOL = (
    "Implicit feedback: rating >= {threshold} is positive. Per user, interactions ordered by (timestamp, item_id); "
    "last positive -> test, second-last positive -> validation, train = interactions before the validation item; "
    "users with < {min_positives} positives are not evaluated. Full ranking over all catalogue items the user has not "
    "interacted with in train (test also excludes the validation item); score ties broken by catalogue position. "
    "Metrics: HR@10, NDCG@10, MRR."
)


@dataclass(frozen=True)
class TwoTowerDefaults:
    """Two-tower fine-tuning on a 2-core CPU: one pass over a capped sample of (history, next item) pairs.

    One shared MiniLM encodes both towers (mean pooling, L2-normalised; score = cosine / temperature);
    the other items of a batch are the negatives, with the logQ correction. Measured on ML-100K
    validation (2,000 pairs, 6 layers): NDCG@10 0.029 untrained, 0.021 after training without the
    correction (lr 5e-5), 0.040 with it (lr 1e-4). A step costs ~20-30 s on this shared 2-core
    machine, hence 2,000 pairs (32 steps) rather than more.
    """

    epochs: float = 1.0
    batch_size: int = 64
    learning_rate: float = 1e-4
    temperature: float = 0.05
    max_pairs: int = 2000
    pairs_per_user: int = 6
    warmup_ratio: float = 0.1


@dataclass(frozen=True)
class BprDefaults:
    """BPR matrix factorisation: epochs picked by validation NDCG@10 (checked every ``eval_every``)."""

    dim: int = 64
    epochs: int = 60
    eval_every: int = 5
    learning_rate: float = 0.01
    weight_decay: float = 1e-5
    batch_size: int = 2048
    fold_in_reg: float = 1.0


@dataclass(frozen=True)
class RecommendationSpec(DomainSpec):
    """A ranking domain: the protocol's knobs and how item / history texts are written."""

    positive_threshold: float | None = 4.0
    min_positives: int = 3
    k: int = 10
    history_items: int = 20
    # 64 tokens hold the ~5 most recent items: on ML-100K validation the untrained MiniLM scored
    # NDCG@10 0.029 with 64 tokens vs 0.026 with 128, at half the encoding cost.
    history_max_length: int = 64
    item_max_length: int = 48
    dataset: str = "movielens-100k"
    two_tower: TwoTowerDefaults = field(default_factory=TwoTowerDefaults)
    bpr: BprDefaults = field(default_factory=BprDefaults)
    ranker_negatives: int = 30
    baselines: tuple[str, ...] = ("popularity", "bpr")

    def source_files(self, data_dir: str | Path | None = None, *, quiet: bool = False) -> dict[str, Path]:
        """The interactions and items files: ``interactions.*`` + ``items.*`` in ``data_dir`` (a user's
        own data), else MovieLens-100K, fetched on first use (its terms are printed every time)."""
        from domainflow.recsys import data, movielens

        if data_dir is not None:
            return data.find_files(Path(data_dir))
        folder = movielens.fetch_movielens(quiet=quiet)
        return {"interactions": folder / "ml-100k.inter", "items": folder / "ml-100k.item"}

    def read_source(self, files: dict[str, Path]) -> tuple["pd.DataFrame", "pd.DataFrame", dict[str, str]]:
        """Raw interactions and items frames (validated later by ``domainflow.recsys.data.validate``)."""
        from domainflow.recsys import data, movielens

        if Path(files["interactions"]).suffix == ".inter":  # recbole's atomic files: MovieLens
            return movielens.load_frames(Path(files["interactions"]).parent)
        return data.read_table(files["interactions"]), data.read_table(files["items"]), {k: str(v) for k, v in files.items()}

    @property
    def protocol(self) -> str:
        return PROTOCOL.format(threshold=self.positive_threshold, min_positives=self.min_positives)

    def item_text(self, title: str, year: str = "", genres: str = "") -> str:
        """What the item tower reads: "Toy Story (1995). Animation, Children's, Comedy"."""
        text = f"{title} ({year})" if year else title
        kinds = ", ".join(g for g in genres.split("|") if g)
        return f"{text}. {kinds}" if kinds else text

    def history_text(self, item_texts: Sequence[str]) -> str:
        """What the user tower reads: the most recent items first, so truncation drops the oldest."""
        recent = list(item_texts)[-self.history_items :][::-1]
        return " | ".join(recent)


SPEC = register(
    RecommendationSpec(
        name="recommendation",
        description="Movie recommendation from viewing history: two-tower MiniLM + ranker vs popularity and BPR (MovieLens-100K).",
        source=DataSource(
            licence="GroupLens MovieLens terms: no redistribution (fetched from the recbole==1.2.1 wheel, never committed)",
            attribution="F. M. Harper and J. A. Konstan (2015), The MovieLens Datasets: History and Context, ACM TiiS 5(4):19.",
        ),
        text_column="text",
        label_column="item_id",
        label_names=(),
        primary_metric="ndcg_at_10",
        metrics=("hit_rate_at_10", "ndcg_at_10", "mrr"),
        gates=QualityGates(min_metrics={}, tie_tolerance=0.001),
        task_kind="ranking",
        max_length=128,
    )
)
