"""A recommender on disk, and the one scoring path shared by evaluation, serving and the CLI.

Layout of a bundle directory (what the registry stores as a version's ``model/``)::

    recommender.json     format, scorer ("text" or "ranker"), compression recipe, text lengths
    encoder/             the two-tower encoder: config.json, model.safetensors, tokenizer
    items.json           catalogue: item ids, titles, item texts (catalogue order)
    tables.safetensors   per-item arrays: item-tower embeddings (precomputed), popularity,
                         BPR item factors, co-occurrence, genres, years
    ranker.json          the ranker's weights (scorer "ranker" only)

Item embeddings are computed once, offline, by the fp32 item tower; at request time only the
user tower runs. ``compression: "dynamic_int8"`` quantizes that user tower at load time
(a quantized torch model cannot be saved without pickling; quantization is deterministic, so
the reloaded model scores exactly what was evaluated).

Evaluation calls :meth:`Recommender.score_histories` on every user of a stage, serving calls
:meth:`Recommender.recommend` for one request: both go through :meth:`Recommender.scores`, so
a metric describes the code that serves.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainflow.recsys.features import ALL_FEATURES, FEATURES, SEQUENTIAL, ItemTables, history_features
from domainflow.recsys.ranker import LinearRanker
from domainflow.recsys.two_tower import TwoTower, encode

FORMAT_VERSION = 1
METADATA_FILE = "recommender.json"
SCORERS = ("text", "ranker")


class UnknownItemsError(ValueError):
    """Item ids that are not in the model's catalogue (the message lists them)."""

    def __init__(self, field: str, unknown: Sequence[str]) -> None:
        shown = ", ".join(repr(i) for i in list(unknown)[:10]) + (
            f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        )
        super().__init__(f"{field}: unknown item id(s) {shown}")
        self.field = field
        self.unknown = list(unknown)


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    title: str
    score: float


def write_bundle(
    out_dir: Path,
    *,
    encoder_dir: Path,
    items: dict[str, list[str]],
    tables: ItemTables,
    scorer: str,
    text_lengths: dict[str, int],
    ranker: LinearRanker | None = None,
    compression: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Assemble a bundle directory from its parts (the caller publishes it atomically)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if (scorer == "ranker") != (ranker is not None):
        raise ValueError("a 'ranker' bundle needs a ranker, a 'text' bundle must not have one")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(encoder_dir, out_dir / "encoder", dirs_exist_ok=True)
    (out_dir / "items.json").write_text(json.dumps(items, ensure_ascii=False))
    tables.save(out_dir / "tables.safetensors")
    if ranker is not None:
        ranker.save(out_dir / "ranker.json")
    metadata = {
        "format_version": FORMAT_VERSION,
        "architecture": "two_tower_ranker",
        "scorer": scorer,
        "compression": compression,
        "features": list(ranker.features if ranker is not None else FEATURES),
        **text_lengths,
        **(extra or {}),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return out_dir


def read_bundle_metadata(path: Path) -> dict[str, Any]:
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a recommender bundle: {METADATA_FILE} is missing")
    metadata = json.loads(file.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported recommender format {metadata.get('format_version')!r}")
    return metadata


def load_user_tower(encoder_dir: Path, compression: str | None) -> tuple[TwoTower, Any]:
    """The encoder from safetensors (never a pickle), quantized when the bundle says so."""
    from domainflow.modeling import load_encoder

    encoder, tokenizer = load_encoder(str(encoder_dir))
    model = TwoTower(encoder)
    model.eval()
    if compression:
        from domainflow.compression import apply_recipe

        model = apply_recipe(model, compression)
    return model, tokenizer


class Recommender:
    """A loaded bundle: user tower, item tables, optional ranker, and the catalogue."""

    def __init__(self, path: Path, render_history: Callable[[Sequence[str]], str]) -> None:
        self.path = Path(path)
        self.metadata = read_bundle_metadata(self.path)
        self.render_history = render_history
        self.model, self.tokenizer = load_user_tower(self.path / "encoder", self.metadata.get("compression"))
        items = json.loads((self.path / "items.json").read_text())
        self.item_ids: list[str] = list(items["item_id"])
        self.titles: list[str] = list(items["title"])
        self.item_texts: list[str] = list(items["text"])
        self.item_pos = {item: i for i, item in enumerate(self.item_ids)}
        self.tables = ItemTables.load(self.path / "tables.safetensors")
        self.ranker = LinearRanker.load(self.path / "ranker.json") if self.metadata["scorer"] == "ranker" else None
        if self.ranker is not None and not set(self.ranker.features) <= set(ALL_FEATURES):
            unknown = sorted(set(self.ranker.features) - set(ALL_FEATURES))
            raise ValueError(f"{self.path}: ranker features {unknown} are not among this code's {ALL_FEATURES}")
        if self.ranker is not None and not self.tables.has_transitions and set(self.ranker.features) & set(SEQUENTIAL):
            raise ValueError(f"{self.path}: the ranker reads {SEQUENTIAL} but tables.safetensors has no transitions")

    @property
    def scorer(self) -> str:
        return self.metadata["scorer"]

    def positions(self, item_ids: Sequence[str], field: str) -> list[int]:
        """Catalogue positions of ``item_ids``; unknown ids raise :class:`UnknownItemsError` naming them all."""
        unknown = [i for i in item_ids if i not in self.item_pos]
        if unknown:
            raise UnknownItemsError(field, unknown)
        return [self.item_pos[i] for i in item_ids]

    def user_embeddings(
        self, histories: Sequence[Sequence[int]], extra_texts: Sequence[Sequence[str]] | None = None
    ) -> np.ndarray:
        """User-tower embeddings: each history's item texts, then its free texts (most recent last)."""
        extra_texts = extra_texts or [[] for _ in histories]
        texts = [
            self.render_history([self.item_texts[i] for i in history] + list(free))
            for history, free in zip(histories, extra_texts, strict=True)
        ]
        with torch.inference_mode():
            return encode(self.model, self.tokenizer, texts, int(self.metadata["history_max_length"]))

    def scorer_for(self, history: Sequence[object]) -> str:
        """Which scorer answers a history: the ranker needs catalogue items in it.

        Why: the ranker was fitted on histories of catalogue items, where its collaborative
        features carry most of the signal; for a history of free texts only, those features are 0
        and its weights (e.g. a negative weight on popularity, which BPR's item bias already
        covers) rank obscure items first. The two-tower cosine is the model made for text.
        """
        return "ranker" if self.ranker is not None and len(history) else "text"

    def scores(
        self, history: Sequence[int], user_embedding: np.ndarray, candidates: np.ndarray | None = None
    ) -> np.ndarray:
        """Scores of the candidates (default: every item) for one history (see :meth:`scorer_for`)."""
        if self.ranker is None or self.scorer_for(history) == "text":
            items = slice(None) if candidates is None else candidates
            return self.tables.item_embeddings[items] @ user_embedding
        return self.ranker.score(
            history_features(self.tables, history, user_embedding, candidates, self.ranker.features)
        )

    def score_histories(self, histories: Sequence[Sequence[int]], embeddings: np.ndarray | None = None) -> np.ndarray:
        """users x items scores for many histories of catalogue items (evaluation).

        ``embeddings``: the histories' user-tower embeddings when already computed (bundles that
        share an encoder and its compression share them; evaluation encodes once for both).
        """
        if embeddings is None:
            embeddings = self.user_embeddings(histories)
        if not len(histories):
            return np.zeros((0, len(self.item_ids)))
        return np.stack([self.scores(h, e) for h, e in zip(histories, embeddings, strict=True)])

    def user_tower_key(self) -> tuple[str, str | None]:
        """What determines the user embeddings: the encoder's bytes and the compression recipe."""
        from domainflow.fingerprint import path_fingerprint

        return path_fingerprint(self.path / "encoder"), self.metadata.get("compression")

    def recommend(
        self,
        history: Sequence[str] = (),
        texts: Sequence[str] = (),
        candidates: Sequence[str] | None = None,
        k: int = 10,
    ) -> list[Recommendation]:
        """The top ``k`` items for a history of item ids and/or free texts.

        Without ``candidates`` every catalogue item outside the history competes; with them,
        exactly those are ranked. Ties are broken by catalogue position, as in evaluation. A
        history of free texts only is scored by the text model (:meth:`scorer_for`).
        """
        if not history and not texts:
            raise ValueError("history: give at least one item id or text")
        if k < 1:
            raise ValueError("k must be at least 1")
        positions = self.positions(list(history), "history")
        if candidates is None:
            pool = np.setdiff1d(np.arange(len(self.item_ids)), positions)
        else:
            if not candidates:
                raise ValueError("candidates: give at least one item id, or leave it out to rank the whole catalogue")
            pool = np.asarray(list(dict.fromkeys(self.positions(list(candidates), "candidates"))), dtype=np.int64)
        embedding = self.user_embeddings([positions], [list(texts)])[0]
        scores = self.scores(positions, embedding, pool)
        order = np.lexsort((pool, -scores))[:k]
        return [Recommendation(self.item_ids[pool[j]], self.titles[pool[j]], float(scores[j])) for j in order]
