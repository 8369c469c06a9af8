"""The domain spec: everything the pipeline needs to know about one business use case, as data.

A domain says *what* (data, labels, metrics, gates, business policy); the core knows *how*.
Specs are frozen pydantic models for three reasons:

* a domain file (TOML) is validated field by field, with errors that name the field;
* the sub-records (``training``, ``compression``, ``gates``…) travel into Prefect tasks as
  inputs, so a task's cache key changes whenever the part of the spec it uses does;
* every field carries its default and its help text, which the README's field list is made from.

Each task kind (text classification, ranking) has its own spec class, a subclass of
:class:`DomainSpec`; :mod:`domainflow.kinds` maps a kind's name to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from domainflow import settings
from domainflow.fingerprint import path_fingerprint, value_fingerprint
from domainflow.monitoring.config import MonitorConfig
from domainflow.pii import PiiMode

if TYPE_CHECKING:
    from domainflow.retrieval import Nearest


class Record(BaseModel):
    """A frozen, strict record: unknown fields are errors (a typo in a domain file must not be ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed, validated like a domain file (``dataclasses.replace`` for records)."""
        return type(self).model_validate({**dict(self), **changes})


class DataSource(Record):
    """Where a domain's labelled data comes from.

    ``train``/``test`` are files (CSV, JSON/JSONL or Parquet). A relative path is resolved against
    ``base_dir`` (a domain file's own folder), else against the data directory. ``hf_dataset`` names
    a Hugging Face dataset instead; it is used only when the network is on (``DOMAINFLOW_ONLINE=1``).
    """

    train: str | None = Field(None, description="training file (CSV, JSON/JSONL or Parquet)")
    test: str | None = Field(None, description="test file; its rows are never trained on")
    base_dir: str | None = Field(
        None, description="folder relative paths are resolved against (set by the domain file loader)"
    )
    hf_dataset: str | None = Field(None, description="a Hugging Face dataset, used instead when DOMAINFLOW_ONLINE=1")
    hf_config: str | None = Field(None, description="the hub dataset's configuration")
    hf_train_split: str = Field("train", description="the hub dataset's training split")
    hf_test_split: str = Field("test", description="the hub dataset's test split")
    hf_column_map: dict[str, str] = Field(default_factory=dict, description="hub column -> spec column")
    licence: str = Field("", description="the data's licence, shown in model cards")
    attribution: str = Field("", description="who made the data, shown in model cards")

    def resolve(self, data_dir: str | Path | None = None) -> dict[str, Path]:
        """Absolute paths of the train and test files; ``data_dir`` overrides the base folder."""
        if self.train is None or self.test is None:
            raise ValueError("this data source names no local files (hf_dataset only)")
        if data_dir:
            base = Path(data_dir)
        else:
            base = Path(self.base_dir) if self.base_dir else settings.data_dir()
        resolved = {}
        for split, name in (("train", self.train), ("test", self.test)):
            path = Path(name)
            if data_dir and not path.is_absolute():
                path = Path(path.name)  # an override folder holds train/test files directly
            resolved[split] = path if path.is_absolute() else (base / path).resolve()
        return resolved


class QualityGates(Record):
    """Thresholds a challenger must meet before it may replace the champion."""

    min_metrics: dict[str, float] = Field(
        default_factory=dict, description="absolute floors on the test set, e.g. {accuracy = 0.9}"
    )
    tie_tolerance: float = Field(
        0.001,
        ge=0.0,
        description="a challenger within this of the champion's primary metric is a tie, and a tie keeps the champion",
    )
    max_compression_drop: float = Field(
        0.01, ge=0.0, description="a compressed model may lose at most this much of its fp32 parent's primary metric"
    )
    min_compression_speedup: float = Field(
        1.3, ge=0.0, description="and must be at least this much faster (texts/s at batch 32, measured side by side)"
    )
    max_epsilon: float | None = Field(
        None,
        gt=0.0,
        description=(
            "differential privacy required of the model that ships: a candidate without a DP guarantee (see "
            "[privacy]), or whose spent epsilon is higher, fails the gates and is not ranked; absent: no requirement"
        ),
    )


#: Where training can report (``TrainingArguments.report_to``); see domainflow/tracking.py.
Reporter = Literal["tensorboard", "mlflow"]


class TrainingDefaults(Record):
    """Fine-tuning recipe tuned for a 2-core CPU (see tasks/finetune.py for why)."""

    epochs: float = Field(3.0, gt=0.0, description="fine-tuning epochs")
    batch_size: int = Field(32, ge=1, description="training batch size")
    encoder_lr: float = Field(8e-5, gt=0.0, description="learning rate of the encoder")
    head_lr: float = Field(1e-3, gt=0.0, description="learning rate of the classification head")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.06, ge=0.0, le=1.0, description="share of steps spent warming the learning rate up")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    early_stopping_patience: int = Field(1, ge=0, description="epochs without validation gain before training stops")
    probe_c: float = Field(1.0, gt=0.0, description="inverse L2 strength of the linear probe (scikit-learn's C)")
    class_weighting: bool = Field(False, description="weigh the loss by inverse class frequency (imbalanced domains)")
    processes: int = Field(
        1, ge=1, description="data-parallel training processes (torch DDP under torchrun; gloo on CPUs, nccl on GPUs)"
    )
    report_to: tuple[Reporter, ...] = Field(
        (),
        description=(
            "where the Trainer reports losses and metrics: tensorboard, mlflow (each needs the extra of its name); "
            "empty: off. Not part of a model's cache key"
        ),
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many_reporters(cls, value: Any) -> Any:
        """``report_to = "mlflow"`` means ``["mlflow"]``; a reporter named twice reports once."""
        names = [value] if isinstance(value, str) else value
        return tuple(dict.fromkeys(names)) if isinstance(names, list | tuple) else value


#: Parameter-efficient methods (the peft library's names, lower case); see domainflow/peft_models.py.
AdapterKind = Literal["lora", "ia3"]


class PeftSettings(Record):
    """Parameter-efficient fine-tuning candidates: the encoder's weights stay frozen, a small adapter and the head
    train (from the linear probe, by the fine-tuning recipe of ``[training]``), and the candidate folder stores
    only them plus the base encoder's path and fingerprint. They compete with ``finetuned`` on validation."""

    methods: tuple[AdapterKind, ...] = Field(
        (), description="adapters to train beside the full fine-tune: lora, ia3 (needs the peft extra); empty: none"
    )
    epochs: float | None = Field(None, gt=0.0, description="training epochs (default: the fine-tuning epochs)")
    lora_rank: int = Field(8, ge=1, description="rank of LoRA's low-rank update of each adapted weight")
    lora_alpha: int = Field(16, ge=1, description="LoRA's update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the input of LoRA's update (0.1 cost ~15% more training time and ~17% more peak "
        "memory on a Banking77 slice, for no measured gain)",
    )
    target_modules: tuple[str, ...] = Field(
        ("query", "key", "value", "dense"),
        min_length=1,
        description="Linear layers LoRA adapts: names or name suffixes of the encoder's modules ('dense' matches "
        "the attention output and both feed-forward layers of a BERT layer)",
    )
    lora_lr: float = Field(1e-3, gt=0.0, description="learning rate of the LoRA weights (the head keeps head_lr)")
    ia3_target_modules: tuple[str, ...] = Field(
        ("key", "value", "output.dense"), min_length=1, description="modules whose activations IA3 rescales"
    )
    ia3_feedforward_modules: tuple[str, ...] = Field(
        ("output.dense",), description="of those, the ones whose input (not output) is rescaled"
    )
    ia3_lr: float = Field(3e-3, gt=0.0, description="learning rate of the IA3 scaling vectors")

    @model_validator(mode="after")
    def _consistent(self) -> PeftSettings:
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise ValueError(f"methods are listed twice: {repeated}")
        stray = sorted(set(self.ia3_feedforward_modules) - set(self.ia3_target_modules))
        if stray:
            raise ValueError(f"ia3_feedforward_modules {stray} are not among ia3_target_modules")
        return self


#: What a private (DP-SGD) or federated candidate trains on the frozen pretrained encoder: the linear head alone,
#: or a LoRA adapter (the ``[peft]`` table's rank, alpha and modules) and the head. See domainflow/local_training.py.
TrainableSet = Literal["head", "lora"]


class PrivacySettings(Record):
    """Differentially private candidates (``dp-head``, ``dp-lora``): DP-SGD with opacus (per-example gradient
    clipping, Gaussian noise, Poisson sampling), the noise calibrated to spend at most ``target_epsilon`` over
    ``epochs``. They start from the pretrained encoder and a zero head, not from the linear probe (which saw the
    training texts without any guarantee). Off unless ``methods`` names one: DP training is the costliest
    candidate. See domainflow/private_training.py."""

    methods: tuple[TrainableSet, ...] = Field(
        (), description="DP candidates to train: head, lora (needs the privacy extra: opacus); empty: none"
    )
    target_epsilon: float = Field(8.0, gt=0.0, description="privacy budget epsilon the whole training may spend")
    target_delta: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="delta of the (epsilon, delta) guarantee; absent: 1 / (10 x training rows), below 1/n",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="each example's gradient is clipped to this L2 norm")
    epochs: int = Field(
        10, ge=1, description="passes over the training split (the noise is calibrated for them; measured: README)"
    )
    batch_size: int = Field(
        512,
        ge=1,
        description="about the expected batch size: Poisson sampling puts each row in each step with rate "
        "1/ceil(n/b) (opacus), so a step averages n/ceil(n/b) rows",
    )
    head_lr: float = Field(1e-2, gt=0.0, description="Adam learning rate of the head")
    lora_lr: float = Field(2e-3, gt=0.0, description="Adam learning rate of the LoRA weights")

    @field_validator("methods")
    @classmethod
    def _methods_once(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        return _listed_once(methods)


class FederatedSettings(Record):
    """Federated candidates (``federated-head``, ``federated-lora``), simulated on this machine with Flower: the
    training split is divided among ``clients`` (non-IID by label), each trains the trainable weights locally for
    ``local_epochs`` per round, and Flower's FedAvg averages them (weighted by client rows) over ``rounds``. They
    start from the pretrained encoder and a zero head. See domainflow/federated.py."""

    methods: tuple[TrainableSet, ...] = Field(
        (), description="federated candidates to train: head, lora (needs the federated extra: flwr); empty: none"
    )
    clients: int = Field(5, ge=2, description="simulated clients (branches) the training split is divided among")
    rounds: int = Field(10, ge=1, description="FedAvg rounds")
    local_epochs: float = Field(1.0, gt=0.0, description="passes over its own rows each client makes per round")
    partition: Literal["dirichlet", "shards", "iid"] = Field(
        "dirichlet",
        description="how rows are divided: dirichlet (each label's rows split by Dirichlet(alpha) shares), shards "
        "(rows sorted by label, cut into shards, shards_per_client each) or iid (uniformly at random)",
    )
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration: small is more skewed by label")
    shards_per_client: int = Field(2, ge=1, description="label-sorted shards per client (partition = shards)")
    batch_size: int = Field(32, ge=1, description="local training batch size")
    head_lr: float = Field(1e-2, gt=0.0, description="Adam learning rate of the head (local training)")
    lora_lr: float = Field(2e-3, gt=0.0, description="Adam learning rate of the LoRA weights (local training)")
    engine: Literal["in_process", "simulation"] = Field(
        "in_process",
        description="in_process: Flower's FedAvg strategy drives the clients in this process (no Ray start, one "
        "copy of the model); simulation: Flower's simulation engine (clients in Ray actors; needs ray)",
    )

    @field_validator("methods")
    @classmethod
    def _methods_once(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        return _listed_once(methods)


def _listed_once(methods: tuple[str, ...]) -> tuple[str, ...]:
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"methods are listed twice: {repeated}")
    return methods


class CompressionDefaults(Record):
    """Which compressed candidates a run builds from its best fp32 model, and how."""

    methods: tuple[str, ...] = Field(
        ("onnx_int8", "magnitude_prune", "ffn_prune", "distill", "cascade"),
        description="candidates to build: onnx_int8, dynamic_int8, magnitude_prune, ffn_prune, distill, cascade "
        "(the int8 student answers what it is sure of, the reference's int8 copy the rest; needs distill)",
    )
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of encoder weights zeroed by magnitude pruning")
    ffn_keep_ratio: float = Field(
        0.5, gt=0.0, le=1.0, description="fraction of feed-forward neurons kept by structured pruning"
    )
    recovery_epochs: float = Field(1.0, ge=0.0, description="training epochs after structured pruning")
    student_layers: int = Field(3, ge=1, description="encoder layers of the distilled student")
    distill_epochs: float | None = Field(
        None, gt=0.0, description="distillation epochs (default: the fine-tuning epochs)"
    )
    distill_temperature: float = Field(2.0, gt=0.0, description="softening of the teacher's labels")
    distill_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="weight of the teacher's labels against the true ones"
    )
    cascade_margin: float = Field(
        0.005,
        ge=0.0,
        lt=1.0,
        description="the cascade's threshold keeps validation accuracy within this of its strong model's",
    )
    cascade_max_passed_on: float = Field(
        0.5, gt=0.0, le=1.0, description="most texts (share) a cascade may pass on to its strong model"
    )


class EnsembleSettings(Record):
    """An ensemble candidate built from the run's own fp32 candidates (see ``domainflow.fusion``)."""

    members: tuple[str, ...] = Field(
        ("finetuned", "linear_probe"),
        min_length=2,
        description="fp32 candidates of the run whose class probabilities are averaged",
    )
    weights: Literal["equal", "validation"] = Field(
        "equal",
        description="equal, or fit on the validation split (lowest log-loss on a 0.05 grid; the ensemble's own "
        "validation score is then slightly optimistic when candidates are ranked)",
    )
    distill_from_ensemble: bool = Field(
        True, description="the distilled student learns from the ensemble's soft labels instead of the reference's"
    )


class RetrievalFallback(Record):
    """Answer an unsure prediction from the nearest known question (a training text) when it is close enough.

    The similarity threshold is calibrated per model on the validation split (see
    ``domainflow.retrieval``) so that such answers are right ``target_precision`` of the time.
    """

    consult_below: float = Field(
        0.5, ge=0.0, le=1.0, description="top-class probability under which the nearest known question is consulted"
    )
    target_precision: float = Field(
        0.9, gt=0.0, le=1.0, description="how often an answer taken from the nearest known question must be right"
    )


#: Out-of-scope scores (see domainflow/outofscope.py); all read what the model computes anyway.
OutOfScopeScore = Literal["mahalanobis", "cosine", "energy", "max_softmax"]


class OutOfScopeDetection(Record):
    """Tell "none of my labels" apart from an unsure in-scope text, and escalate it (never answer it).

    A score of the model's own outputs is thresholded; the threshold is calibrated per model on
    the validation split so that flagging costs at most ``max_in_scope_cost`` of in-scope accuracy
    (see ``domainflow.outofscope``). Measured on test against ``eval_files`` when given.
    """

    enabled: bool = Field(True, description="flag and escalate out-of-scope texts (false: measure nothing, flag none)")
    score: OutOfScopeScore = Field(
        "mahalanobis",
        description=(
            "mahalanobis (to the nearest class centroid of unit-length embeddings, shared covariance), "
            "cosine (to the nearest class centroid), energy (-logsumexp of the logits) or max_softmax"
        ),
    )
    max_in_scope_cost: float = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description=(
            "in-scope accuracy the flagging may cost on validation: the share of in-scope validation texts "
            "that are classified correctly and flagged"
        ),
    )
    label: str | None = Field(
        None,
        description=(
            "a label of the domain's data meaning out of scope (e.g. 'oos'): when present it is trained like any "
            "other, and a text predicted as it is flagged"
        ),
    )
    eval_files: tuple[str, ...] = Field(
        (),
        description=(
            "files of out-of-scope texts (a 'text' column; CSV, JSON/JSONL or Parquet; relative to the domain "
            "file) on which evaluation measures out-of-scope recall"
        ),
    )
    eval_sample: int = Field(500, ge=1, description="at most this many texts of each eval file (a seeded sample)")


class AnswerPolicy(Record):
    """What the business does with a prediction: fields per label, and for intent domains a reply.

    With ``replies`` a confident prediction (score >= ``confidence_threshold``) gets its label's
    reply; an unsure one the reply of the nearest known question when the domain has a retrieval
    fallback and it is close enough; otherwise the ``escalation_reply``. ``tags`` adds fixed fields
    to every answer of a label (e.g. ``bearish = {signal = "negative"}``).
    """

    replies: dict[str, str] = Field(default_factory=dict, description="label -> reply text (or give replies_file)")
    replies_file: str | None = Field(None, description="CSV with columns label,reply (relative to the domain file)")
    confidence_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="a prediction scored below this is not answered with its own reply"
    )
    escalation_reply: str = Field(
        "Thanks for your message: a colleague will pick it up and reply shortly.",
        description="sent when no reply is trusted",
    )
    tags: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="label -> fields added to every answer of that label"
    )

    def respond(self, label: str, score: float, nearest: Nearest | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = dict(self.tags.get(label, {}))
        if not self.replies:
            return answer
        if score >= self.confidence_threshold and label in self.replies:
            return {**answer, "action": "reply", "reply": self.replies[label]}
        if nearest is not None and nearest.close_enough and nearest.label in self.replies:
            return {
                **answer,
                "action": "reply_from_similar_question",
                "reply": self.replies[nearest.label],
                "nearest_question": nearest.as_dict(),
            }
        answer.update(action="escalate", reply=self.escalation_reply)
        if nearest is not None:
            answer["nearest_question"] = nearest.as_dict()  # a hint for the agent who picks it up
        return answer


class DomainSpec(Record):
    """What every domain declares, whatever its task kind."""

    name: str = Field(
        description="the domain's name: registry folder, URL path, CLI argument",
        pattern=r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$",
    )
    description: str = Field("", description="one line shown by `domainflow domains` and in model cards")
    task_kind: str = Field("text_classification", description="text_classification or ranking")
    source: DataSource = Field(default_factory=DataSource, description="where the data comes from")
    text_column: str = Field("text", description="column holding the text")
    label_column: str = Field("label", description="column holding the label (a name or an integer id)")
    primary_metric: str = Field("accuracy", description="the metric gates and champion comparisons use")
    metrics: tuple[str, ...] = Field(("accuracy", "macro_f1"), description="metrics computed on validation and test")
    gates: QualityGates = Field(default_factory=QualityGates, description="promotion thresholds")
    default_model: str = Field("minilm", description="base encoder: minilm (shipped), a folder, or a hub name")
    max_length: int = Field(128, ge=8, le=4096, description="tokens per text")

    @model_validator(mode="after")
    def _primary_is_computed(self) -> DomainSpec:
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not among metrics {list(self.metrics)}")
        return self

    def as_kind(self, spec_type: type[SpecT]) -> SpecT:
        """This spec as ``spec_type``, for code that handles one task kind; TypeError for a domain of another kind."""
        if not isinstance(self, spec_type):
            raise TypeError(f"domain {self.name!r} is a {self.task_kind} domain, not a {spec_type.__name__}")
        return self


SpecT = TypeVar("SpecT", bound=DomainSpec)


class ClassificationSpec(DomainSpec):
    """A text classification domain (intents, sentiment, …)."""

    label_names: tuple[str, ...] | None = Field(
        None,
        alias="labels",
        description=(
            "the labels in id order; absent: taken from the training data (sorted) "
            "and then fixed by the champion's lineage"
        ),
    )
    training: TrainingDefaults = Field(default_factory=TrainingDefaults, description="fine-tuning recipe")
    peft: PeftSettings = Field(default_factory=PeftSettings, description="parameter-efficient fine-tuning candidates")
    privacy: PrivacySettings = Field(
        default_factory=PrivacySettings, description="differentially private (DP-SGD) candidates"
    )
    federated: FederatedSettings = Field(
        default_factory=FederatedSettings, description="federated candidates (simulated clients, FedAvg)"
    )
    compression: CompressionDefaults = Field(default_factory=CompressionDefaults, description="compressed candidates")
    ensemble: EnsembleSettings | None = Field(
        None, description="an ensemble candidate of the run's fp32 candidates (absent: none)"
    )
    retrieval: RetrievalFallback | None = Field(
        None, description="answer unsure predictions from the nearest known question"
    )
    out_of_scope: OutOfScopeDetection | None = Field(
        None, description="flag texts that belong to none of the labels, and escalate them"
    )
    answers: AnswerPolicy = Field(default_factory=AnswerPolicy, description="replies, escalation and per-label tags")
    monitoring: MonitorConfig | None = Field(None, description="topic tracking and surge alerts (`domainflow monitor`)")
    validation_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="share of train held out for early stopping and model choice"
    )
    min_examples_per_class: int = Field(5, ge=1, description="fewest training rows a class present in train may have")
    min_test_rows: int = Field(
        20, ge=1, description="fewest test rows (after max_test_samples): on fewer, the gates would compare noise"
    )
    leakage: Literal["drop", "fail"] = Field(
        "drop",
        description=(
            "a train text equal to a test text, exactly or up to case/whitespace: drop it from train "
            "(with a warning and a list in the ingest report) or fail"
        ),
    )
    max_file_mb: int = Field(
        2048, ge=1, description="largest train/test file ingest reads, in MiB (files are read whole into memory)"
    )
    pii: PiiMode = Field(
        "mask",
        description=(
            "personal data in texts (e-mail addresses, phone, card and account numbers, IBANs; see domainflow/pii.py): "
            "mask (replaced by typed placeholders such as <CARD_NUMBER> at ingest, before anything is written, and "
            "in serving and monitoring before a text is logged, stored or explained), reject (ingest stops naming "
            "file, line and kind; the service answers 422), or off"
        ),
    )

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    _name_to_index: dict[str, int] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._name_to_index = {name: i for i, name in enumerate(self.label_names or ())}

    @field_validator("label_names")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if labels is None:
            return None
        if not labels or any(not str(label).strip() for label in labels):
            raise ValueError("labels must be a non-empty list of non-empty names")
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise ValueError(f"labels are listed twice: {duplicated}")
        return labels

    @model_validator(mode="after")
    def _privacy_gate_can_be_met(self) -> ClassificationSpec:
        """``gates.max_epsilon`` only DP candidates can meet: without one, or with a larger target, no candidate
        could ever ship, which is a mistake in the domain file, not a run to make."""
        limit = self.gates.max_epsilon
        if limit is None:
            return self
        if not self.privacy.methods:
            raise ValueError(f"gates.max_epsilon = {limit} requires DP candidates: list [privacy] methods")
        if self.privacy.target_epsilon > limit:
            raise ValueError(
                f"privacy.target_epsilon {self.privacy.target_epsilon} exceeds gates.max_epsilon {limit}: "
                "every DP candidate would fail the gate"
            )
        return self

    @model_validator(mode="after")
    def _policy_names_known_labels(self) -> ClassificationSpec:
        if self.label_names is None:
            return self
        known = set(self.label_names)
        for what, names in (("answers.replies", self.answers.replies), ("answers.tags", self.answers.tags)):
            unknown = sorted(set(names) - known)
            if unknown:
                raise ValueError(f"{what} names labels the domain does not have: {unknown}")
        if self.monitoring is not None and self.monitoring.negative_label not in known:
            raise ValueError(f"monitoring.negative_label {self.monitoring.negative_label!r} is not a label")
        if self.out_of_scope is not None and self.out_of_scope.label not in (None, *known):
            raise ValueError(f"out_of_scope.label {self.out_of_scope.label!r} is not a label")
        return self

    @property
    def num_labels(self) -> int:
        return len(self.label_names or ())

    def with_labels(self, labels: tuple[str, ...]) -> ClassificationSpec:
        """The same spec with a fixed label list (the labels ingest took from the data), validated again."""
        return self.replace(label_names=tuple(labels))

    def label_index(self, value: Any) -> int | None:
        """Map a raw label (its name, or its integer id) to an index; None when unknown."""
        return label_index(self._name_to_index, value)

    def respond(self, label: str, score: float, nearest: Nearest | None = None) -> dict[str, Any]:
        """What the business does with a prediction (reply, escalation, tags). A Python domain may override it."""
        return self.answers.respond(label, score, nearest)

    # -- the slices tasks receive (so their cache keys follow the spec) ---------------------------

    def data_slice(self) -> DataSlice:
        return DataSlice(
            text_column=self.text_column,
            label_column=self.label_column,
            label_names=self.label_names,
            validation_fraction=self.validation_fraction,
            min_examples_per_class=self.min_examples_per_class,
            min_test_rows=self.min_test_rows,
            leakage=self.leakage,
            max_file_mb=self.max_file_mb,
            pii=self.pii,
        )

    def evaluation_slice(self) -> EvaluationSlice:
        detection = self.out_of_scope if self.out_of_scope is not None and self.out_of_scope.enabled else None
        files: tuple[Path, ...] = ()
        if detection is not None:  # absolute paths, and their contents in the slice: the cache key follows the texts
            base = Path(self.source.base_dir) if self.source.base_dir else settings.data_dir()
            files = tuple(
                path if path.is_absolute() else (base / path).resolve() for path in map(Path, detection.eval_files)
            )
            missing = [str(path) for path in files if not path.is_file()]
            if missing:
                raise FileNotFoundError(f"{self.name}: out_of_scope.eval_files do not exist: {', '.join(missing)}")
            detection = detection.replace(eval_files=tuple(map(str, files)))
        return EvaluationSlice(
            metrics=self.metrics,
            primary_metric=self.primary_metric,
            retrieval=self.retrieval,
            out_of_scope=detection,
            out_of_scope_texts=value_fingerprint([path_fingerprint(path) for path in files]) if files else "",
        )


class DataSlice(Record):
    """What ingest reads of a classification spec."""

    text_column: str
    label_column: str
    label_names: tuple[str, ...] | None
    validation_fraction: float
    min_examples_per_class: int
    # Defaults as in ClassificationSpec, so a slice built by hand (a test, a script) gets the same rules.
    min_test_rows: int = Field(20, ge=1)
    leakage: Literal["drop", "fail"] = "drop"
    max_file_mb: int = Field(2048, ge=1)
    pii: PiiMode = "mask"
    pii_detectors: str | None = Field(
        None, description="the PII detectors' library versions (filled in when pii is on; see the validator)"
    )
    _name_to_index: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _with_detector_versions(cls, data: Any) -> Any:
        """With ``pii`` on, what ingest writes depends on the detectors' library versions too (a new numbering plan
        masks other texts): they are part of this record, so every cache key that takes the slice follows them."""
        if isinstance(data, dict) and data.get("pii", "mask") != "off" and data.get("pii_detectors") is None:
            from domainflow.pii import detector_version

            data = {**data, "pii_detectors": detector_version()}
        return data

    def model_post_init(self, context: Any, /) -> None:
        self._name_to_index = {name: i for i, name in enumerate(self.label_names or ())}

    @property
    def num_labels(self) -> int:
        return len(self.label_names or ())

    def label_index(self, value: Any) -> int | None:
        """Map a raw label (its name, or its integer id) to an index; None when unknown."""
        return label_index(self._name_to_index, value)


class EvaluationSlice(Record):
    """What evaluation reads of a spec."""

    metrics: tuple[str, ...]
    primary_metric: str
    retrieval: RetrievalFallback | None = None
    out_of_scope: OutOfScopeDetection | None = None  # enabled only, with absolute eval_files
    out_of_scope_texts: str = Field("", description="fingerprint of the eval files' contents")


def label_index(name_to_index: dict[str, int], value: Any) -> int | None:
    """A raw label (a name, or an integer id given as int, float or digits) as an index; None when unknown."""
    if isinstance(value, str):
        text = value.strip()
        if text in name_to_index:
            return name_to_index[text]
        if not text.lstrip("-").isdigit():
            return None
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(name_to_index):
        return value
    return None
