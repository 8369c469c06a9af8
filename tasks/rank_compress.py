"""Compress stage of a ranking domain: the reference bundle with an int8 user tower.

The item tower is already gone from the request path (its embeddings are precomputed in every
bundle), so what runs per request is the user tower on the history text. This task copies the
reference bundle and records ``compression: "dynamic_int8"`` in ``recommender.json``; loading
re-applies :func:`domainflow.compression.quantize_dynamic_int8` to the user tower (a quantized
torch model cannot be saved without pickling). The copy is checked to load and score before it
is published. Whether it is deployed is the gate's call: within the NDCG budget of its parent
and measurably faster, like any compressed candidate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task

from domainflow.fingerprint import path_fingerprint
from domainflow.records import ModelRef
from domainflow.recsys.bundle import METADATA_FILE, Recommender
from domainflow.recsys.spec import RankingSpec
from tasks.caching import CODE_AND_INPUTS, require_shared
from tasks.rank_train import _out_dir, _publish

RECIPE = "dynamic_int8"


def quantized_copy(source: Path, out: Path, render_history) -> None:
    """Copy ``source`` into ``out`` with the int8 recipe, and check that it loads and scores."""
    shutil.copytree(source, out, dirs_exist_ok=True)
    metadata = json.loads((out / METADATA_FILE).read_text())
    metadata["compression"] = RECIPE
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    recommender = Recommender(out, render_history)
    if not recommender.recommend(history=recommender.item_ids[:3], k=1):
        raise RuntimeError(f"{out}: the quantized bundle returned no recommendation")


@task(name="quantize-user-tower", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def quantize_user_tower(spec: RankingSpec, reference: ModelRef) -> ModelRef:
    """``<reference>-int8``: same weights and tables, user tower quantized at load time."""
    require_shared(reference)
    name = f"{reference.name}-int8"
    target = _out_dir(spec.name, "models", name, quantize_user_tower, reference.fingerprint, RECIPE, spec.history_items)
    _publish(target, lambda out: quantized_copy(Path(reference.path), out, spec.history_text))
    return ModelRef(
        name=name,
        path=str(target),
        fingerprint=path_fingerprint(target),
        parent=reference.name,
        compression=RECIPE,
        train_seconds=reference.train_seconds,
    )
