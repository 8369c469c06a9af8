"""DomainSpec: the only place domain knowledge lives.

Tasks and flows never branch on a domain's name; they ask the spec for its data
sources, columns, labels, metrics, thresholds and training defaults. Adding a
domain means writing one module that builds a spec and calls :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from domainflow import settings

if TYPE_CHECKING:
    from domainflow.retrieval import Nearest


@dataclass(frozen=True)
class DataSource:
    """Where a domain's labelled data comes from.

    ``train``/``test`` are files (CSV, JSON/JSONL or Parquet), relative to the data
    directory unless absolute. ``hf_dataset`` names a Hugging Face dataset instead;
    it is used only when the network is available (``DOMAINFLOW_ONLINE=1``).
    """

    train: str | None = None
    test: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_train_split: str = "train"
    hf_test_split: str = "test"
    hf_column_map: Mapping[str, str] = field(default_factory=dict)  # hub column -> spec column
    licence: str = ""
    attribution: str = ""

    def resolve(self, data_dir: str | Path | None = None) -> dict[str, Path]:
        """Absolute paths of the train and test files; ``data_dir`` overrides the base folder."""
        if self.train is None or self.test is None:
            raise ValueError("this data source names no local files (hf_dataset only)")
        base = Path(data_dir) if data_dir else settings.data_dir()
        resolved = {}
        for split, name in (("train", self.train), ("test", self.test)):
            path = Path(name)
            if data_dir and not path.is_absolute():
                path = Path(path.name)  # an override folder holds train/test files directly
            resolved[split] = path if path.is_absolute() else base / path
        return resolved


@dataclass(frozen=True)
class QualityGates:
    """Thresholds a challenger must meet before it may replace the champion.

    * ``min_metrics``: absolute floors on the test set, e.g. ``{"accuracy": 0.9}``.
    * ``tie_tolerance``: a challenger whose primary metric is within this of the
      champion's is a tie, and a tie keeps the champion (no churn, no slow drift down).
    * ``max_compression_drop``: a compressed model may lose at most this much of its
      fp32 parent's primary metric …
    * ``min_compression_speedup``: … and must be at least this much faster (texts/s,
      batch 32, same texts, measured side by side).
    """

    min_metrics: Mapping[str, float] = field(default_factory=dict)
    tie_tolerance: float = 0.001
    max_compression_drop: float = 0.01
    min_compression_speedup: float = 1.3


@dataclass(frozen=True)
class TrainingDefaults:
    """Fine-tuning recipe tuned for a 2-core CPU (see tasks/finetune.py for why)."""

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


@dataclass(frozen=True)
class CompressionDefaults:
    """Which compressed candidates a run builds from its best fp32 model, and how.

    * ``methods``: the candidates to build. ``onnx_int8`` (ONNX Runtime int8, the default) and
      ``dynamic_int8`` (torch int8) are the two int8 recipes; either or both may be listed.
    * ``sparsity``: fraction of encoder weights zeroed by unstructured magnitude pruning.
    * ``ffn_keep_ratio``: fraction of feed-forward neurons kept by structured pruning,
      followed by ``recovery_epochs`` of training to win back accuracy.
    * ``student_layers``: encoder layers of the distilled student (taken from the teacher);
      ``distill_temperature`` / ``distill_alpha``: softening of the teacher's labels and
      their weight against the true labels; the student is also quantized with the int8 recipes listed.
    """

    methods: tuple[str, ...] = ("onnx_int8", "magnitude_prune", "ffn_prune", "distill")
    sparsity: float = 0.5
    ffn_keep_ratio: float = 0.5
    recovery_epochs: float = 1.0
    student_layers: int = 3
    distill_epochs: float | None = None  # None: the domain's fine-tuning epochs
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5


@dataclass(frozen=True)
class RetrievalFallback:
    """Answer an unsure prediction from the nearest known question (a training text) when it is close enough.

    * ``consult_below``: top-class probability under which the classifier's own answer is not trusted;
    * ``target_precision``: how often an answer taken from the nearest known question must be right.
      The similarity threshold that achieves it is calibrated per model on the validation split
      (see ``domainflow.retrieval``); a model for which none does never answers by retrieval.
    """

    consult_below: float = 0.5
    target_precision: float = 0.9


@dataclass(frozen=True)
class DomainSpec:
    """Everything the pipeline needs to know about one business use case."""

    name: str
    description: str
    source: DataSource
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    primary_metric: str = "accuracy"
    metrics: tuple[str, ...] = ("accuracy", "macro_f1")
    gates: QualityGates = field(default_factory=QualityGates)
    training: TrainingDefaults = field(default_factory=TrainingDefaults)
    compression: CompressionDefaults = field(default_factory=CompressionDefaults)
    retrieval: RetrievalFallback | None = None
    task_kind: str = "text_classification"
    default_model: str = "minilm"
    max_length: int = 128
    validation_fraction: float = 0.1
    min_examples_per_class: int = 5

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def label_index(self, value: Any) -> int | None:
        """Map a raw label (its name, or its integer id) to an index; None when unknown."""
        if isinstance(value, str):
            text = value.strip()
            if text in self._name_to_index:
                return self._name_to_index[text]
            if text.lstrip("-").isdigit():
                value = int(text)
            else:
                return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.num_labels:
            return value
        return None

    @cached_property
    def _name_to_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    def respond(self, label: str, score: float, nearest: "Nearest | None" = None) -> dict[str, Any]:
        """What the business does with a prediction (reply, escalation, alert…). Default: nothing.

        ``nearest`` is the closest known question, given when the domain declares a retrieval
        fallback and the prediction's score is under its ``consult_below``.
        """
        return {}


_DOMAINS: dict[str, DomainSpec] = {}


def register(spec: DomainSpec) -> DomainSpec:
    """Add a domain to the registry (later registrations under the same name replace earlier ones)."""
    _DOMAINS[spec.name] = spec
    return spec


def get_domain(name: str) -> DomainSpec:
    from domains import load_builtin_domains

    load_builtin_domains()
    try:
        return _DOMAINS[name]
    except KeyError:
        known = ", ".join(sorted(_DOMAINS)) or "none"
        raise KeyError(f"unknown domain {name!r}; known domains: {known}") from None


def list_domains() -> list[str]:
    from domains import load_builtin_domains

    load_builtin_domains()
    return sorted(_DOMAINS)
