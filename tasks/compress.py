"""Compression: smaller or faster candidates derived from the best fp32 model of a run.

One task per method, so each is cached and resumed on its own:

* ``quantize`` — int8 dynamic quantization, either in ONNX Runtime (``onnx_int8``: the int8
  graph is stored) or in torch (``dynamic_int8``: the parent's safetensors plus a recipe that
  loading re-applies, because a quantized torch model cannot be saved without pickling);
* ``prune_magnitude`` — unstructured global magnitude pruning (zeros, no speed-up in dense
  kernels: reported honestly);
* ``prune_ffn`` — structured pruning of feed-forward neurons (real compute removed), then
  a short recovery training;
* ``distill`` — a student with a subset of the teacher's layers, trained on the teacher's
  soft labels plus the true labels.

Every candidate records its fp32 ancestor in ``ModelRef.parent`` (a chain such as
distil → quantize still points at the fp32 teacher), because the deploy gate judges a
compressed model against the model it replaces. Whether a candidate is worth deploying
is not decided here: evaluation measures it and the gate decides.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task

from domainflow import settings
from domainflow.compression import (
    ONNX_RECIPES,
    RECIPES,
    alternate_layers,
    keep_layers,
    prune_ffn_neurons,
    prune_unstructured,
)
from domainflow.fingerprint import path_fingerprint
from domainflow.modeling import (
    WEIGHTS_FILE,
    TextClassifier,
    load_classifier,
    read_metadata,
    save_classifier,
    write_metadata,
)
from domainflow.onnxrt import INT8_FILE, export_onnx_int8
from domainflow.peft_models import ADAPTER_KEY, MERGED_KEY, merged_entry, write_merged_copy
from domainflow.records import DatasetRef, ModelRef
from tasks.caching import CODE_AND_INPUTS, require_shared, step_dir
from tasks.finetune import TrainConfig, finish_atomically, train_classifier


def _target(domain: str, name: str, task_fn: Callable[..., Any], *inputs: object) -> Path:
    """A candidate's folder, named by the step's code and its inputs."""
    return step_dir(settings.runs_dir() / domain / "models", name, task_fn, *inputs)


def _root_parent(model: ModelRef) -> str:
    return model.parent if model.compression and model.parent else model.name


# Candidate names say which runtime serves them: "finetuned-int8" (torch), "finetuned-onnx-int8" (ORT).
CANDIDATE_SUFFIX = {"dynamic_int8": "int8", "onnx_int8": "onnx-int8"}


def quantize_model(parent: ModelRef, out_dir: Path, recipe: str = "dynamic_int8") -> ModelRef:
    """An int8 candidate of ``parent`` (pure: no Prefect needed).

    ``dynamic_int8`` copies the parent's files and records the recipe that loading re-applies;
    ``onnx_int8`` exports the parent to ONNX, quantizes it with ONNX Runtime and stores the
    int8 graph in place of the safetensors (config and tokenizer are kept for serving). A PEFT
    parent's adapter is merged into its base weights first, so either copy stands alone.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown compression recipe {recipe!r}; known: {', '.join(RECIPES)}")
    metadata = read_metadata(parent.path)
    if metadata.get("compression"):
        raise ValueError(
            f"{parent.name} is already quantized ({metadata['compression']}); quantize its fp32 form instead"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with standalone_weights(Path(parent.path), out_dir.parent) as source:
        metadata = read_metadata(source)
        if recipe in ONNX_RECIPES:
            loaded = load_classifier(source, apply_compression=False)
            export_onnx_int8(loaded.torch_model, loaded.tokenizer, out_dir / INT8_FILE)
            metadata["onnx_file"] = INT8_FILE
        for item in source.iterdir():
            if not (recipe in ONNX_RECIPES and item.name == WEIGHTS_FILE):
                shutil.copy2(item, out_dir / item.name)
    name = f"{parent.name}-{CANDIDATE_SUFFIX[recipe]}"
    metadata.update(
        {
            "compression": recipe,
            "parent": _root_parent(parent),
            "parent_fingerprint": parent.fingerprint,
            "candidate": name,
        }
    )
    write_metadata(out_dir, metadata)
    steps = "+".join(filter(None, [parent.compression, recipe]))
    return ModelRef(
        name=name,
        path=str(out_dir),
        fingerprint=path_fingerprint(out_dir),
        parent=_root_parent(parent),
        compression=steps,
        train_seconds=parent.train_seconds,
    )


@contextmanager
def standalone_weights(model_dir: Path, scratch_in: Path) -> Iterator[Path]:
    """``model_dir``, or for a PEFT candidate a scratch copy with its adapter merged into the base weights
    (peft's ``merge_and_unload``): what an int8 export or a pruned copy is made from must be whole weights,
    not an adapter that needs its base on disk (see ``domainflow.peft_models``)."""
    if ADAPTER_KEY not in read_metadata(model_dir):
        yield model_dir
        return
    with tempfile.TemporaryDirectory(dir=scratch_in) as scratch:
        yield write_merged_copy(model_dir, Path(scratch) / "merged")


def compress_model(parent: ModelRef, recipe: str, out_dir: Path) -> ModelRef:
    """Back-compatible name for a recipe candidate, written atomically."""
    return finish_atomically(lambda out: quantize_model(parent, out, recipe), out_dir)


def _rewrite_weights(
    parent: ModelRef, out_dir: Path, change: Callable[[TextClassifier], dict], name: str, compression: str
) -> ModelRef:
    """Load ``parent`` in fp32 (a PEFT candidate's adapter merged), apply ``change`` to its weights, save a normal
    model directory."""
    loaded = load_classifier(parent.path, apply_compression=False)  # a PEFT parent: its adapter merged in memory
    model = loaded.torch_model
    details = change(model)
    metadata = {
        k: v
        for k, v in loaded.metadata.items()
        if k not in {"compression", "format_version", "architecture", "label_names", "max_length", ADAPTER_KEY}
    }
    if ADAPTER_KEY in loaded.metadata:  # whole weights now: say what was merged (as write_merged_copy does)
        metadata[MERGED_KEY] = merged_entry(loaded.metadata[ADAPTER_KEY])
    metadata.update(
        {
            "candidate": name,
            "parent": parent.name,
            "parent_fingerprint": parent.fingerprint,
            "compression_details": details,
        }
    )
    save_classifier(
        model,
        loaded.tokenizer,
        out_dir,
        label_names=loaded.label_names,
        max_length=loaded.max_length,
        extra_metadata=metadata,
    )
    return ModelRef(
        name=name,
        path=str(out_dir),
        fingerprint=path_fingerprint(out_dir),
        parent=parent.name,
        compression=compression,
        train_seconds=parent.train_seconds,
    )


def magnitude_prune_model(parent: ModelRef, out_dir: Path, sparsity: float) -> ModelRef:
    name = f"{parent.name}-sparse{round(sparsity * 100)}"
    return _rewrite_weights(
        parent, out_dir, lambda m: {"sparsity": prune_unstructured(m, sparsity)}, name, f"magnitude_prune_{sparsity:g}"
    )


def ffn_prune_model(
    parent: ModelRef, dataset: DatasetRef, config: TrainConfig, out_dir: Path, keep_ratio: float, recovery_epochs: float
) -> ModelRef:
    """Structured FFN pruning, then ``recovery_epochs`` of training to win back what was cut."""
    name = f"{parent.name}-ffn{round(keep_ratio * 100)}"
    compression = f"ffn_prune_{keep_ratio:g}"
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        pruned = _rewrite_weights(
            parent,
            Path(scratch) / "pruned",
            lambda m: {"intermediate_size": prune_ffn_neurons(m, keep_ratio)},
            name,
            compression,
        )
        if recovery_epochs <= 0:
            shutil.copytree(pruned.path, out_dir)
            return pruned.model_copy(update={"path": str(out_dir), "fingerprint": path_fingerprint(out_dir)})
        ref = train_classifier(
            dataset,
            Path(pruned.path),
            config,
            out_dir,
            name=name,
            parent=parent.name,
            compression=compression,
            epochs=recovery_epochs,
            extra_metadata={
                "parent": parent.name,
                "compression_details": {"keep_ratio": keep_ratio, "recovery_epochs": recovery_epochs},
            },
        )
    return ref.model_copy(update={"train_seconds": parent.train_seconds + ref.train_seconds})


def distill_model(
    teacher: ModelRef,
    dataset: DatasetRef,
    config: TrainConfig,
    out_dir: Path,
    *,
    student_layers: int,
    epochs: float,
    temperature: float,
    alpha: float,
    soft_labels_from: ModelRef | None = None,
    parent: str | None = None,
) -> ModelRef:
    """A student with ``student_layers`` of the teacher's layers (spread evenly), trained on soft + true labels.

    ``soft_labels_from`` (an ensemble, say) gives the soft labels instead of ``teacher``, which still gives the
    student's initial layers. ``parent`` (default: the teacher) is the candidate the gate judges the student
    against: the run's reference, which may be that ensemble.
    """
    parent = parent or teacher.name
    loaded = load_classifier(teacher.path, apply_compression=False)
    student = loaded.torch_model
    depth = student.config.num_hidden_layers
    if student_layers >= depth:
        raise ValueError(f"a student needs fewer layers than its teacher ({depth}), got {student_layers}")
    layers = alternate_layers(depth, student_layers)
    keep_layers(student, layers)
    name = f"distilled-l{student_layers}" + (f"-{soft_labels_from.name}" if soft_labels_from is not None else "")
    labels_from = soft_labels_from or teacher
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        init = Path(scratch) / "student-init"
        save_classifier(
            student,
            loaded.tokenizer,
            init,
            label_names=loaded.label_names,
            max_length=loaded.max_length,
            extra_metadata={"base_model": loaded.metadata.get("base_model")},
        )
        ref = train_classifier(
            dataset,
            init,
            config,
            out_dir,
            name=name,
            parent=parent,
            compression=f"distill_l{student_layers}",
            epochs=epochs,
            teacher_dir=Path(labels_from.path),
            distill_temperature=temperature,
            distill_alpha=alpha,
            extra_metadata={
                "parent": parent,
                "compression_details": {
                    "teacher_layers_kept": layers,
                    "temperature": temperature,
                    "alpha": alpha,
                    "soft_labels_from": labels_from.name,
                },
            },
        )
    return ref


@task(name="quantize", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def quantize(parent: ModelRef, domain: str, recipe: str = "onnx_int8") -> ModelRef:
    """int8 dynamic quantization of ``parent`` with ``recipe`` (``onnx_int8`` or ``dynamic_int8``)."""
    require_shared(parent)
    name = f"{parent.name}-{CANDIDATE_SUFFIX.get(recipe, recipe)}"
    return compress_model(parent, recipe, _target(domain, name, quantize, parent.fingerprint, recipe))


@task(name="prune-magnitude", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def prune_magnitude(parent: ModelRef, domain: str, sparsity: float) -> ModelRef:
    """Unstructured magnitude pruning at the domain's sparsity."""
    require_shared(parent)
    target = _target(domain, f"{parent.name}-sparse", prune_magnitude, parent.fingerprint, sparsity)
    return finish_atomically(lambda out: magnitude_prune_model(parent, out, sparsity), target)


@task(name="prune-ffn", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def prune_ffn(
    parent: ModelRef, dataset: DatasetRef, config: TrainConfig, keep_ratio: float, recovery_epochs: float
) -> ModelRef:
    """Structured feed-forward pruning plus recovery training."""
    require_shared(parent, dataset)
    target = _target(
        dataset.domain,
        f"{parent.name}-ffn",
        prune_ffn,
        parent.fingerprint,
        dataset.fingerprint,
        config,
        keep_ratio,
        recovery_epochs,
    )
    return finish_atomically(
        lambda out: ffn_prune_model(parent, dataset, config, out, keep_ratio, recovery_epochs), target
    )


@task(name="distill", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def distill(
    teacher: ModelRef,
    dataset: DatasetRef,
    config: TrainConfig,
    student_layers: int,
    epochs: float,
    temperature: float,
    alpha: float,
    soft_labels_from: ModelRef | None = None,
    parent: str | None = None,
) -> ModelRef:
    """Knowledge distillation of ``teacher`` (or of ``soft_labels_from``'s labels) into a shallower student."""
    require_shared(teacher, dataset, *([soft_labels_from] if soft_labels_from is not None else []))
    target = _target(
        dataset.domain,
        "distilled",
        distill,
        teacher.fingerprint,
        dataset.fingerprint,
        config,
        student_layers,
        epochs,
        temperature,
        alpha,
        soft_labels_from.fingerprint if soft_labels_from is not None else None,
        parent,
    )
    return finish_atomically(
        lambda out: distill_model(
            teacher,
            dataset,
            config,
            out,
            student_layers=student_layers,
            epochs=epochs,
            temperature=temperature,
            alpha=alpha,
            soft_labels_from=soft_labels_from,
            parent=parent,
        ),
        target,
    )
