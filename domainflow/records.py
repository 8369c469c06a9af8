"""Small records that cross task boundaries.

Tasks exchange these (paths plus fingerprints plus a few numbers), never models or
tensors. They are pydantic models so that Prefect can persist them as JSON results
(no pickles) and so that a malformed record fails loudly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class DatasetRef(BaseModel):
    """A validated ``DatasetDict`` saved with ``save_to_disk`` (splits: train, validation, test)."""

    domain: str
    path: str
    fingerprint: str = Field(description="content hash of the source files and the split recipe")
    test_fingerprint: str = Field(
        description="content hash of the test split alone: champion and challenger must share it"
    )
    num_rows: dict[str, int]
    label_names: list[str]


class ModelRef(BaseModel):
    """A model directory (safetensors + config.json + tokenizer + domainflow.json)."""

    name: str = Field(description="candidate name, e.g. 'linear_probe', 'finetuned', 'finetuned-int8'")
    path: str
    fingerprint: str
    parent: str | None = Field(default=None, description="candidate name of the fp32 parent, for compressed models")
    compression: str | None = None
    train_seconds: float = 0.0


class Evaluation(BaseModel):
    """One candidate's measured quality, size and CPU speed on a dataset.

    Quality and size come from the evaluate step; the speed fields are filled by the
    speed step, which measures every candidate of a run side by side in one process.
    """

    candidate: ModelRef
    test_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    size_bytes: int = Field(
        description="bytes of the weights as loaded for inference (int8 layers count 1 byte per weight)"
    )
    disk_bytes: int = Field(description="bytes of the model directory on disk")
    parameters: int
    zero_fraction: float = Field(0.0, description="fraction of encoder Linear weights that are exactly zero")
    report_dir: str = Field(description="folder with metrics.json, per-class report, confusion matrix, model card")
    texts_per_second_batch1: float | None = None
    texts_per_second_batch32: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    peak_rss_mb: float | None = Field(
        None, description="peak resident memory of a process that loads the model and classifies a batch"
    )
    answer_policy: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "for a domain with a retrieval fallback: how test texts are answered "
            "(confidently, by the nearest known question, escalated) and how well"
        ),
    )
    out_of_scope: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "for a domain with out-of-scope detection: its calibrated threshold and, on test, in-scope accuracy "
            "with and without the flagging, false alarms, out-of-scope recall (overall and per source), AUROC"
        ),
    )
    fusion: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "for a cascade: its members, threshold and validation calibration, and the share of test texts it "
            "passed on to its strong model as it really ran"
        ),
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "what training the candidate (or its fp32 ancestor) cost, where recorded: trainable parameters, "
            "wall seconds, peak resident memory (MB) while training, and for a PEFT candidate the bytes its "
            "adapter and head add to the base encoder on disk"
        ),
    )
