"""Scoring a batch's items with a champion and appending them to the store, chunk by chunk.

Only ids the store does not hold yet are scored, so a rerun after a crash does the
missing work and nothing twice. Each chunk is scored, then committed in one
transaction: a crash loses at most the chunk in flight, which the rerun scores again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from domainflow.monitoring.store import ScoreStore, ts_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreCounts:
    inserted: int
    already_stored: int


def score_frame(
    store: ScoreStore,
    items: pd.DataFrame,
    model_dir: str | Path,
    *,
    model_version: int | None,
    batch: str,
    chunk_size: int = 256,
    progress: Callable[[int, int], Any] | None = None,
) -> ScoreCounts:
    """Score the rows of ``items`` (columns item_id, ts, text, topics, source) not yet in ``store`` and insert them.

    The model is loaded only when there is something to score.
    """
    from domainflow.modeling import load_classifier, predict_proba

    ids = items["item_id"].tolist()
    present = store.existing_ids(ids)
    pending = items[~items["item_id"].isin(present)].reset_index(drop=True)
    if pending.empty:
        return ScoreCounts(inserted=0, already_stored=len(present))
    loaded = load_classifier(model_dir)
    labels = loaded.label_names
    inserted = 0
    for start in range(0, len(pending), chunk_size):
        chunk = pending.iloc[start : start + chunk_size]
        probabilities = predict_proba(loaded, chunk["text"].tolist())
        rows = []
        for (_, item), probs in zip(chunk.iterrows(), probabilities.tolist(), strict=True):
            best = max(range(len(labels)), key=probs.__getitem__)
            rows.append(
                {
                    "item_id": item["item_id"],
                    "ts": ts_text(pd.Timestamp(item["ts"])),
                    "text": item["text"],
                    "topics": list(item["topics"]),
                    "label": labels[best],
                    "score": probs[best],
                    "probs": {label: round(p, 6) for label, p in zip(labels, probs, strict=True)},
                    "model_version": model_version,
                    "batch": batch,
                    "source": item["source"],
                }
            )
        inserted += store.insert_items(rows)
        if progress is not None:
            progress(min(start + chunk_size, len(pending)), len(pending))
    return ScoreCounts(inserted=inserted, already_stored=len(present))
