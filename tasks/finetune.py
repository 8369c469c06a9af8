"""Fine-tuning: two fp32 candidates from one pretrained encoder.

1. ``linear_probe`` — the cheap baseline: frozen encoder, mean-pooled embeddings,
   a logistic-regression head (scikit-learn). On Banking77 with all-MiniLM-L6-v2 it
   reaches ~93% in about two minutes on 2 cores: the floor fine-tuning must beat.
2. ``finetuned`` — full fine-tuning with the transformers Trainer, *starting from the
   probe*: the head begins where logistic regression ended, so the first steps
   refine a good classifier instead of back-propagating noise from a random head into
   the encoder. The head gets a higher learning rate than the encoder, batches are
   grouped by length (Banking77 averages 15 tokens, so padding would dominate), and
   early stopping watches the validation split. A naive loop (random head, one
   learning rate) reached 57.8% after an epoch here; this recipe converges in a few.

Both candidates are saved as model directories (see ``domainflow.modeling``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from pydantic import BaseModel, Field

from domainflow import settings
from domainflow.atomic import build_atomically
from domainflow.fingerprint import path_fingerprint, value_fingerprint
from domainflow.footprint import FOOTPRINT_KEY, footprint, training_section
from domainflow.logs import run_logger
from domainflow.metrics import compute_metrics
from domainflow.modeling import (
    METADATA_FILE,
    TextClassifier,
    embed_texts,
    load_classifier,
    load_encoder,
    resolve_base_model,
    save_classifier,
)
from domainflow.peft_models import AdapterMethod, BaseEncoder, attach_adapter, save_adapter_classifier
from domainflow.records import DatasetRef, ModelRef
from domainflow.spec import ClassificationSpec
from domainflow.tracking import published_name, require_reporters, training_report
from tasks.caching import CODE_AND_INPUTS, require_shared, step_dir

LINEAR_PROBE = "linear_probe"
FINETUNED = "finetuned"


class TrainConfig(BaseModel):
    """Every knob that changes a trained model; part of the cache key and the lineage."""

    base_model: str
    base_fingerprint: str
    num_layers: int | None = None
    max_length: int = 128
    primary_metric: str = "accuracy"  # picks the best epoch
    epochs: float = 3.0
    batch_size: int = 32
    encoder_lr: float = 8e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    label_smoothing: float = 0.0
    early_stopping_patience: int = 1
    probe_c: float = 1.0
    class_weighting: bool = False
    seed: int = 42
    # Data-parallel processes for the Trainer (torch DDP under torchrun; see tasks.distributed_train). Part of
    # the key: gradients averaged over shards are not bit-identical to one process's.
    processes: int = 1
    # Where the Trainer reports (domainflow.tracking). Left out of the cache key, the step folders and the lineage
    # (exclude=True drops it from model_dump, which Prefect's input hash and step_dir read): reporting changes no
    # weight, so toggling it neither retrains nor renames a candidate; a cached step trains, and reports, nothing.
    report_to: tuple[str, ...] = Field((), exclude=True)


def make_train_config(
    spec: ClassificationSpec,
    model: str | None,
    *,
    epochs: float | None = None,
    seed: int = 42,
    num_layers: int | None = None,
    processes: int | None = None,
    report_to: Sequence[str] | None = None,
) -> TrainConfig:
    """The domain's training recipe, overridden by the user's choices: every knob a trained model depends on.

    ``report_to`` (``domainflow run --report-to``) replaces the domain's list; a reporter whose library
    is missing fails here, before any training.
    """
    base = resolve_base_model(model or spec.default_model)
    base_fingerprint = path_fingerprint(base) if Path(base).exists() else base
    recipe = spec.training.model_dump()
    if epochs is not None:
        recipe["epochs"] = epochs
    if processes is not None:
        recipe["processes"] = processes
    if report_to is not None:
        recipe["report_to"] = tuple(report_to)
    require_reporters(recipe["report_to"])
    return TrainConfig(
        base_model=base,
        base_fingerprint=base_fingerprint,
        num_layers=num_layers,
        max_length=spec.max_length,
        primary_metric=spec.primary_metric,
        seed=seed,
        **recipe,
    )


def model_dir(dataset: DatasetRef, name: str, task_fn: Any, *inputs: Any) -> Path:
    """A candidate's folder, named by the step's code and inputs (two code versions never share one)."""
    return step_dir(settings.runs_dir() / dataset.domain / "models", name, task_fn, dataset.fingerprint, *inputs)


def _class_weights(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over present classes), for imbalanced domains."""
    counts = np.bincount(labels, minlength=num_labels).astype(float)
    weights = np.where(counts > 0, counts.sum() / (num_labels * np.maximum(counts, 1)), 0.0)
    return weights


def train_linear_probe(dataset: DatasetRef, config: TrainConfig, out_dir: Path) -> ModelRef:
    """Frozen encoder + logistic regression, folded into a ``TextClassifier`` head."""
    from datasets import load_from_disk
    from sklearn.linear_model import LogisticRegression

    log = run_logger(__name__)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    splits = load_from_disk(dataset.path)
    encoder, tokenizer = load_encoder(config.base_model, config.num_layers)
    model = TextClassifier(encoder, num_labels=len(dataset.label_names))
    texts = list(splits["train"]["text"])
    labels = np.asarray(splits["train"]["label"])
    log.info("linear probe: embedding %d training texts with the frozen encoder", len(texts))
    features = embed_texts(model, tokenizer, texts, config.max_length).numpy()

    # Raw features, no standardisation: MiniLM has near-constant dimensions, and dividing
    # by their tiny spread gives head weights ~1e31 whose gradients overflow once fine-tuning starts.
    probe = LogisticRegression(
        C=config.probe_c,
        max_iter=3000,
        class_weight="balanced" if config.class_weighting else None,
        random_state=config.seed,
    )
    probe.fit(features, labels)

    weight = np.zeros((len(dataset.label_names), features.shape[1]))
    bias = np.full(len(dataset.label_names), -1e4)  # classes absent from train are never predicted
    weight[probe.classes_] = probe.coef_
    bias[probe.classes_] = probe.intercept_
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(weight).float())
        model.classifier.bias.copy_(torch.from_numpy(bias).float())

    seconds = time.perf_counter() - started
    save_classifier(
        model,
        tokenizer,
        out_dir,
        label_names=dataset.label_names,
        max_length=config.max_length,
        extra_metadata={"candidate": LINEAR_PROBE, "base_model": config.base_model, "train_seconds": seconds},
    )
    log.info("linear probe trained in %.1f s (train accuracy %.4f)", seconds, probe.score(features, labels))
    return ModelRef(name=LINEAR_PROBE, path=str(out_dir), fingerprint=path_fingerprint(out_dir), train_seconds=seconds)


class _ProgressToLogger:
    """Trainer callback: training progress into the run's log (and so the Prefect UI)."""

    def __new__(cls, log: Any) -> Any:
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                if logs:
                    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
                    log.info(
                        "step %d/%d (epoch %.2f): %s", state.global_step, state.max_steps, state.epoch or 0.0, shown
                    )

        return Callback()


def finetune_classifier(
    dataset: DatasetRef, init_dir: Path, config: TrainConfig, out_dir: Path, checkpoints: Path | None = None
) -> ModelRef:
    """Full fine-tuning from the probe with the Trainer; resumes from its last checkpoint after a crash."""
    return train_classifier(
        dataset, init_dir, config, out_dir, name=FINETUNED, parent=LINEAR_PROBE, checkpoints=checkpoints
    )


def train_classifier(
    dataset: DatasetRef,
    init_dir: Path,
    config: TrainConfig,
    out_dir: Path,
    *,
    name: str,
    parent: str | None,
    compression: str | None = None,
    epochs: float | None = None,
    teacher_dir: Path | None = None,
    distill_temperature: float = 2.0,
    distill_alpha: float = 0.5,
    extra_metadata: dict[str, Any] | None = None,
    checkpoints: Path | None = None,
    adapter: AdapterMethod | None = None,
) -> ModelRef:
    """Train the model in ``init_dir`` on the dataset with the Trainer and save it to ``out_dir``.

    Shared by fine-tuning, by recovery training after structured pruning, by distillation
    (``teacher_dir``: the teacher's logits on every training text are computed once, up front,
    and travel with the batches, so training costs no teacher forward passes) and by
    parameter-efficient fine-tuning (``adapter``: the encoder stays frozen, an adapter and the head
    train, and the folder stores only them; see ``domainflow.peft_models``). The candidate's metadata
    records what training cost (``domainflow.footprint``): trainable parameters, peak memory, wall time.
    """
    log = run_logger(__name__)
    started = time.perf_counter()
    require_reporters(config.report_to)  # on the worker that trains: before any work
    if config.processes > 1 and not os.environ.get("DOMAINFLOW_DDP_CHILD"):
        return _train_in_processes(locals_of_call(locals()), config, out_dir, started, log)
    # Checkpoints sit beside the final folder (not the private build folder), so a crashed run's next try resumes.
    checkpoints = checkpoints or out_dir.parent / f"{out_dir.name}.checkpoints"
    with training_section() as section:  # one training loop at a time in a process (domainflow.footprint)
        fitted = fit_classifier(
            dataset,
            init_dir,
            config,
            out_dir,
            checkpoints,
            name=name,
            epochs=epochs,
            adapter=adapter,
            distillation=(
                Distillation(teacher_dir, distill_temperature, distill_alpha) if teacher_dir is not None else None
            ),
            reported={"candidate": name, "parent": parent, "compression": compression},
        )
    seconds = section.seconds
    model, primary = fitted.model, config.primary_metric
    metadata = {
        "candidate": name,
        "base_model": config.base_model,
        "init": str(init_dir),
        "train_seconds": seconds,
        f"best_validation_{primary}": fitted.best_metric,
        FOOTPRINT_KEY: footprint(model, section.peak, seconds),
    }
    metadata.update(extra_metadata or {})
    if not fitted.main_process:  # under DDP rank 0 saves the model; the other ranks are done
        return ModelRef(name=name, path=str(out_dir), fingerprint="", parent=parent, compression=compression)
    labels, max_length = dataset.label_names, config.max_length
    if adapter is not None and fitted.base is not None:
        save_adapter_classifier(
            model,
            fitted.tokenizer,
            out_dir,
            label_names=labels,
            max_length=max_length,
            method=adapter,
            base=fitted.base,
            extra_metadata=metadata,
        )
    else:
        save_classifier(
            model, fitted.tokenizer, out_dir, label_names=labels, max_length=max_length, extra_metadata=metadata
        )
    shutil.rmtree(checkpoints, ignore_errors=True)
    log.info(
        "%s trained in %.1f s; best validation %s %.4f", name, seconds, primary, fitted.best_metric or float("nan")
    )
    return ModelRef(
        name=name,
        path=str(out_dir),
        fingerprint=path_fingerprint(out_dir),
        parent=parent,
        compression=compression,
        train_seconds=seconds,
    )


@dataclass
class Fitted:
    """A model the Trainer has trained, in eval mode, not yet saved."""

    model: TextClassifier
    tokenizer: Any
    best_metric: float | None
    main_process: bool  # False on the ranks of a DDP run other than 0, which save nothing
    base: BaseEncoder | None = None  # the frozen base encoder under an adapter


def parameter_groups(model: TextClassifier, config: TrainConfig, adapter: AdapterMethod | None) -> list[dict]:
    """The optimizer's groups over the trainable parameters: the head at ``head_lr``; the encoder at
    ``encoder_lr``, decayed except its biases and LayerNorms, or an adapter at its own learning rate without
    decay (IA3's scales start at 1: decay would pull them towards 0, not towards the base model)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if n.startswith("classifier.")]
    encoder = [(n, p) for n, p in trainable if n.startswith("encoder.")]
    if adapter is not None:
        return [
            {"params": [p for _, p in encoder], "lr": adapter.learning_rate, "weight_decay": 0.0},
            {"params": head, "lr": config.head_lr, "weight_decay": 0.0},
        ]
    no_decay = [p for n, p in encoder if "bias" in n or "LayerNorm" in n]
    decay = [p for n, p in encoder if not ("bias" in n or "LayerNorm" in n)]
    return [
        {"params": decay, "lr": config.encoder_lr, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": config.encoder_lr, "weight_decay": 0.0},
        {"params": head, "lr": config.head_lr, "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class Distillation:
    """Soft labels from a teacher: its folder, the softening temperature and their weight against the true labels."""

    teacher_dir: Path
    temperature: float = 2.0
    alpha: float = 0.5


def fit_classifier(
    dataset: DatasetRef,
    init_dir: Path,
    config: TrainConfig,
    out_dir: Path,
    checkpoints: Path,
    *,
    name: str,
    epochs: float | None = None,
    adapter: AdapterMethod | None = None,
    distillation: Distillation | None = None,
    reported: dict[str, Any] | None = None,
) -> Fitted:
    """The Trainer recipe of :func:`train_classifier` (see the module docstring), up to the trained model in
    memory: what saving needs, and what a test inspects (an adapter's base must not have moved). ``reported``
    joins the parameters the training reporters record (the candidate's name and lineage)."""
    from datasets import load_from_disk
    from transformers import (
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from domainflow.modeling import predict_logits

    log = run_logger(__name__)
    primary = config.primary_metric
    set_seed(config.seed)
    loaded = load_classifier(init_dir)
    model, tokenizer = loaded.torch_model, loaded.tokenizer
    base = None
    if adapter is not None:
        base = attach_adapter(model, adapter, config.base_model, config.num_layers)
    model.train()
    splits = load_from_disk(dataset.path)
    teacher_dir = distillation.teacher_dir if distillation is not None else None
    if distillation is not None:
        teacher = load_classifier(distillation.teacher_dir)
        log.info("distillation: scoring %d training texts with the teacher %s", splits["train"].num_rows, teacher_dir)
        logits = predict_logits(teacher, list(splits["train"]["text"]), batch_size=128)
        splits["train"] = splits["train"].add_column(
            "teacher_logits",
            logits.tolist(),
            new_fingerprint=f"teacher-{value_fingerprint(str(teacher_dir), dataset.fingerprint)}",
        )
        model.distill_temperature, model.distill_alpha = distillation.temperature, distillation.alpha

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=config.max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    # An explicit fingerprint stops `datasets` from hashing the closure (it dumps bytecode into the logs).
    recipe = value_fingerprint(dataset.fingerprint, config.max_length, tokenizer.name_or_path)
    train = (
        splits["train"]
        .map(
            tokenize, batched=True, remove_columns=["text"], new_fingerprint=f"train-{recipe}-{teacher_dir is not None}"
        )
        .rename_column("label", "labels")
    )
    valid = (
        splits["validation"]
        .map(tokenize, batched=True, remove_columns=["text"], new_fingerprint=f"valid-{recipe}")
        .rename_column("label", "labels")
    )
    if config.class_weighting:
        weights = _class_weights(np.asarray(splits["train"]["label"]), len(dataset.label_names))
        model.class_weights = torch.tensor(weights, dtype=torch.float32)

    optimizer = torch.optim.AdamW(parameter_groups(model, config, adapter))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun (tasks.distributed_train)
    run_name = published_name(out_dir)
    # Progress every 50 steps, or 4 times an epoch when an epoch is shorter: a small domain's curves get points.
    steps_per_epoch = -(-len(train) // config.batch_size)
    learning_rate = config.encoder_lr if adapter is None else adapter.learning_rate
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs if epochs is None else epochs,
        per_device_train_batch_size=max(1, config.batch_size // world_size),  # the global batch stays the recipe's
        per_device_eval_batch_size=128,
        learning_rate=learning_rate,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="linear",
        label_smoothing_factor=config.label_smoothing,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=primary,
        greater_is_better=True,
        logging_steps=max(1, min(50, steps_per_epoch // 4)),
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=True,
        ddp_backend="gloo" if world_size > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in every step
        report_to=list(config.report_to) or "none",  # rank 0 reports (the Trainer's integrations)
        run_name=run_name,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )

    def validation_metrics(prediction: Any) -> dict[str, float]:
        """The domain's primary metric picks the best epoch (macro-F1 where classes are imbalanced)."""
        predicted = np.argmax(prediction.predictions, axis=-1)
        return compute_metrics(sorted({"accuracy", primary}), predicted, prediction.label_ids)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=valid,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=validation_metrics,
        optimizers=(optimizer, None),
        callbacks=[
            EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience),
            _ProgressToLogger(log),
        ],
    )
    resume = last_complete_checkpoint(checkpoints, log)
    if resume is not None:
        log.info("resuming fine-tuning from %s", resume)
    log.info(
        "%s: training on %d texts for up to %s epochs (batch %d, %s lr %g, head lr %g)",
        name,
        len(train),
        args.num_train_epochs,
        config.batch_size,
        "encoder" if adapter is None else f"{adapter.kind} adapter",
        learning_rate,
        config.head_lr,
    )
    reported = {
        **config.model_dump(),
        **(reported or {"candidate": name}),
        "epochs": args.num_train_epochs,
        "dataset_fingerprint": dataset.fingerprint,
        "teacher": str(teacher_dir) if teacher_dir is not None else None,
        **({"adapter": adapter.model_dump(mode="json")} if adapter is not None else {}),
    }
    with training_report(trainer, config.report_to, domain=dataset.domain, run_name=run_name, params=reported):
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    model.eval()
    model.class_weights = None
    return Fitted(model, tokenizer, trainer.state.best_metric, trainer.is_world_process_zero(), base)


#: train_classifier's parameters, in the order a torchrun child receives them
_CALL_PARAMETERS = (
    "dataset",
    "init_dir",
    "config",
    "out_dir",
    "name",
    "parent",
    "compression",
    "epochs",
    "teacher_dir",
    "distill_temperature",
    "distill_alpha",
    "extra_metadata",
    "checkpoints",
    "adapter",
)


def locals_of_call(values: dict[str, Any]) -> dict[str, Any]:
    """train_classifier's arguments as JSON values (what tasks.distributed_train reads back)."""
    call = {name: values[name] for name in _CALL_PARAMETERS}
    call["dataset"] = call["dataset"].model_dump(mode="json")
    call["config"] = {**call["config"].model_dump(mode="json"), "report_to": list(call["config"].report_to)}
    for key in ("init_dir", "out_dir", "teacher_dir", "checkpoints"):
        if call[key] is not None:
            call[key] = str(call[key])
    if call["adapter"] is not None:
        call["adapter"] = call["adapter"].model_dump(mode="json")
    return call


def _train_in_processes(call: dict[str, Any], config: TrainConfig, out_dir: Path, started: float, log: Any) -> ModelRef:
    """Run the same training call in ``config.processes`` processes (torch DDP) and take what rank 0 saved."""
    import tempfile

    from tasks.distributed_train import launch

    with tempfile.TemporaryDirectory(prefix="domainflow-ddp-") as work:
        launch(call, config.processes, Path(work), log)
    if not (out_dir / METADATA_FILE).is_file():
        raise RuntimeError(f"distributed fine-tuning ended without a model in {out_dir}")
    return ModelRef(
        name=call["name"],
        path=str(out_dir),
        fingerprint=path_fingerprint(out_dir),
        parent=call["parent"],
        compression=call["compression"],
        train_seconds=time.perf_counter() - started,  # the whole launch, as a user waits for it
    )


def last_complete_checkpoint(checkpoints: Path, log: Any) -> Path | None:
    """The newest checkpoint a crash did not tear, or None; torn ones are removed.

    The Trainer writes ``checkpoint-N`` in place, ``trainer_state.json`` last (after the weights,
    optimizer, scheduler and RNG states), so a checkpoint whose state file is missing or not valid
    JSON was cut short by a kill: resuming from it would crash every later run.
    """
    found = sorted(
        checkpoints.glob("checkpoint-*"),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    for candidate in reversed(found):
        try:
            state = json.loads((candidate / "trainer_state.json").read_text())
            if isinstance(state, dict) and "global_step" in state:
                return candidate
        except (OSError, ValueError):
            pass
        log.warning("removing torn checkpoint %s (no complete trainer_state.json): a crash cut it short", candidate)
        shutil.rmtree(candidate, ignore_errors=True)
    return None


def finish_atomically(build: Any, target: Path) -> ModelRef:
    """Build a candidate in a private folder and publish it at ``target`` (see ``domainflow.atomic``)."""
    ref = build_atomically(target, build)
    # re-read: when another run published this key first, its folder (not ours) is the candidate
    return ref.model_copy(update={"path": str(target), "fingerprint": path_fingerprint(target)})


def checkpoints_for(target: Path) -> Path:
    return target.parent / f"{target.name}.checkpoints"


@task(name="linear-probe", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def linear_probe(dataset: DatasetRef, config: TrainConfig) -> ModelRef:
    """Candidate (a): the frozen-encoder baseline."""
    require_shared(dataset)
    target = model_dir(dataset, LINEAR_PROBE, linear_probe, config)
    return finish_atomically(lambda out: train_linear_probe(dataset, config, out), target)


@task(name="finetune", cache_policy=CODE_AND_INPUTS, persist_result=True, result_serializer="json")
def finetune(dataset: DatasetRef, init: ModelRef, config: TrainConfig) -> ModelRef:
    """Candidate (b): full fine-tuning initialised from the probe."""
    require_shared(dataset, init)
    target = model_dir(dataset, FINETUNED, finetune, init.fingerprint, config)
    return finish_atomically(
        lambda out: finetune_classifier(dataset, Path(init.path), config, out, checkpoints_for(target)), target
    )
