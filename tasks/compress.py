"""Compression: smaller or faster candidates derived from the best fp32 model.

Here: int8 dynamic quantization of every Linear layer. The candidate folder keeps
the parent's fp32 safetensors and records the recipe in ``domainflow.json``;
``load_classifier`` re-applies it (a quantized torch model cannot be saved without
pickling, and we never store pickles). Whether the candidate is worth deploying is
not decided here: evaluation measures it and the deploy gate compares it with its
parent (accuracy budget *and* measured speed-up).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from domainflow import settings
from domainflow.compression import RECIPES
from domainflow.fingerprint import path_fingerprint, value_fingerprint
from domainflow.modeling import read_metadata, write_metadata
from domainflow.records import ModelRef
from tasks.caching import CODE_AND_INPUTS


def compress_model(parent: ModelRef, recipe: str, out_dir: Path) -> ModelRef:
    """Write a compressed candidate of ``parent`` (pure: no Prefect needed)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown compression recipe {recipe!r}; known: {', '.join(RECIPES)}")
    if parent.compression:
        raise ValueError(f"{parent.name} is already compressed ({parent.compression}); compress its fp32 parent instead")
    partial = out_dir.parent / f"{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(parent.path, partial)
    metadata = read_metadata(partial)
    metadata.update({"compression": recipe, "parent": parent.name, "parent_fingerprint": parent.fingerprint, "candidate": f"{parent.name}-int8"})
    write_metadata(partial, metadata)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return ModelRef(
        name=f"{parent.name}-int8",
        path=str(out_dir),
        fingerprint=path_fingerprint(out_dir),
        parent=parent.name,
        compression=recipe,
        train_seconds=parent.train_seconds,
    )


@task(name="compress", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def compress(parent: ModelRef, domain: str, recipes: list[str] | None = None) -> list[ModelRef]:
    """Compressed candidates of ``parent``, one per recipe (default: int8 dynamic quantization)."""
    out = []
    for recipe in recipes or ["dynamic_int8"]:
        target = settings.runs_dir() / domain / "models" / f"{parent.name}-{recipe}-{value_fingerprint(parent.fingerprint, recipe)}"
        out.append(compress_model(parent, recipe, target))
    return out
