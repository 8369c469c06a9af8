"""The run's report: a model card per candidate and the compression report.

Written after quality (evaluate) and speed (measure-speed) are known. The compression
report compares every compressed candidate with its fp32 parent — size, memory, speed,
quality and their deltas — and goes into each model card, so the registry version of a
promoted model carries it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from prefect import task

from domainflow import settings
from domainflow.fingerprint import value_fingerprint
from domainflow.modeling import read_metadata
from domainflow.records import DatasetRef, Evaluation
from domainflow.spec import ClassificationSpec
from tasks.artifacts import artifact_key, png_data_uri


def compression_rows(evaluations: Sequence[Evaluation]) -> list[dict[str, Any]]:
    """One row per candidate with its figures and, for compressed ones, the deltas against the fp32 parent
    (every test metric, throughput at batch 32 and 1, size on disk)."""
    by_name = {e.candidate.name: e for e in evaluations}
    rows = []
    for ev in evaluations:
        parent = by_name.get(ev.candidate.parent or "") if ev.candidate.compression else None
        row: dict[str, Any] = {
            "candidate": ev.candidate.name,
            "method": ev.candidate.compression or "fp32",
            "parameters": ev.parameters,
            "weights_mb": round(ev.size_bytes / 1e6, 1),
            "disk_mb": round(ev.disk_bytes / 1e6, 1),
            "peak_rss_mb": round(ev.peak_rss_mb, 0) if ev.peak_rss_mb else None,
            "zeros": round(ev.zero_fraction, 3),
            "texts_per_s_b1": round(ev.texts_per_second_batch1 or 0.0, 1),
            "texts_per_s_b32": round(ev.texts_per_second_batch32 or 0.0, 1),
            "p50_ms": round(ev.latency_ms_p50 or 0.0, 2),
            "p95_ms": round(ev.latency_ms_p95 or 0.0, 2),
        }
        row.update({f"test_{m}": round(v, 4) for m, v in ev.test_metrics.items()})
        row.update(_deltas(ev, parent))
        rows.append(row)
    return rows


def _deltas(ev: Evaluation, parent: Evaluation | None) -> dict[str, Any]:
    """A compressed candidate against its fp32 parent: metric differences, speed-ups and size ratio
    (None for fp32 rows)."""
    deltas: dict[str, Any] = {f"delta_{m}": None for m in ev.test_metrics}
    deltas.update({"speedup_b32": None, "speedup_b1": None, "disk_ratio": None})
    if parent is None:
        return deltas
    for metric, value in ev.test_metrics.items():
        if metric in parent.test_metrics:
            deltas[f"delta_{metric}"] = round(value - parent.test_metrics[metric], 4)
    if parent.texts_per_second_batch32:
        deltas["speedup_b32"] = round((ev.texts_per_second_batch32 or 0.0) / parent.texts_per_second_batch32, 2)
    if parent.texts_per_second_batch1:
        deltas["speedup_b1"] = round((ev.texts_per_second_batch1 or 0.0) / parent.texts_per_second_batch1, 2)
    if parent.disk_bytes:
        deltas["disk_ratio"] = round(ev.disk_bytes / parent.disk_bytes, 3)
    return deltas


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "_nothing to show_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("–" if row.get(c) is None else str(row.get(c)) for c in header) + " |")
    return "\n".join(lines) + "\n"


def plot_latency_vs_quality(rows: Sequence[dict[str, Any]], primary: str, path: Path) -> Path:
    """Each candidate as a point: throughput at batch 32 against the primary metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        x, y = row["texts_per_s_b32"], row[f"test_{primary}"]
        ax.scatter(x, y, s=40, color="tab:blue" if row["method"] == "fp32" else "tab:orange")
        ax.annotate(row["candidate"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("texts/s at batch 32 (CPU, measured side by side)")
    ax.set_ylabel(f"test {primary}")
    ax.set_title("Speed vs quality of this run's candidates (blue: fp32, orange: compressed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_card(spec: ClassificationSpec, ev: Evaluation, dataset: DatasetRef, compression_table: str) -> str:
    """A Markdown model card: what the model is, how it was made, how well and how fast it works."""
    candidate = ev.candidate
    metadata = read_metadata(candidate.path)
    details = metadata.get("compression_details")
    lines = [
        f"# {spec.name} — {candidate.name}",
        "",
        spec.description,
        "",
        "## Model",
        f"- Candidate `{candidate.name}`"
        + (
            f", compressed from `{candidate.parent}` "
            f"({candidate.compression}{'; ' + json.dumps(details) if details else ''})"
            if candidate.compression
            else ", fp32"
        ),
        f"- Base encoder `{metadata.get('base_model', 'unknown')}`, mean pooling + linear head over "
        f"{len(dataset.label_names)} labels",
        f"- {ev.parameters:,} parameters; weights {ev.size_bytes / 1e6:.1f} MB in memory, {ev.disk_bytes / 1e6:.1f} "
        "MB on disk" + (f"; peak memory of a serving process {ev.peak_rss_mb:.0f} MB" if ev.peak_rss_mb else ""),
        f"- Model fingerprint `{candidate.fingerprint}`; training took {candidate.train_seconds:.0f} s on this machine",
        "",
        "## Data",
        f"- {spec.source.train} / {spec.source.test} ({spec.source.licence}). {spec.source.attribution}",
        "- Rows: " + ", ".join(f"{split} {rows:,}" for split, rows in dataset.num_rows.items()),
        f"- Dataset fingerprint `{dataset.fingerprint}`, test-set fingerprint `{dataset.test_fingerprint}`",
        "",
        "## Quality",
        "| split | "
        + " | ".join(ev.test_metrics)
        + " |",  # every key: a metric module may return several (recall_0, …)
        "|---|" + "---|" * len(ev.test_metrics),
        "| test | " + " | ".join(f"{ev.test_metrics.get(m, float('nan')):.4f}" for m in ev.test_metrics) + " |",
        "| validation | "
        + " | ".join(f"{ev.validation_metrics.get(m, float('nan')):.4f}" for m in ev.test_metrics)
        + " |",
        "",
        "Deployment floors: "
        + (", ".join(f"{k} ≥ {v}" for k, v in spec.gates.min_metrics.items()) or "none")
        + ". Per-class results: `per_class.csv`.",
        "",
        f"## Speed (CPU, {torch.get_num_threads()} threads, measured side by side with the run's other candidates)",
        f"- Batch 1: {ev.texts_per_second_batch1 or 0:.1f} texts/s, p50 {ev.latency_ms_p50 or 0:.1f} ms, p95 "
        f"{ev.latency_ms_p95 or 0:.1f} ms",
        f"- Batch 32: {ev.texts_per_second_batch32 or 0:.1f} texts/s",
        "",
        "## Compression report of this run",
        compression_table,
        "Unstructured sparsity leaves dense matrices of the same shape: it saves neither time nor disk in PyTorch's "
        "dense kernels.",
        "",
        *answer_policy_lines(spec, ev),
        "## Intended use and limits",
        "- Trained for this domain's labels only; texts far from the training data get low confidence and should go "
        "to the domain's fallback.",
        "- All figures come from one test split on one machine.",
    ]
    return "\n".join(lines) + "\n"


def answer_policy_lines(spec: ClassificationSpec, ev: Evaluation) -> list[str]:
    """The retrieval fallback's figures on test, for a domain that declares one."""
    policy = ev.answer_policy
    if spec.retrieval is None or not policy:
        return []
    threshold = policy.get("similarity_threshold")
    precision = policy.get("retrieval_precision")
    return [
        f"## Answer policy on the test set (confidence threshold {spec.retrieval.consult_below})",
        f"- Answered confidently: {policy['answered_confidently']:.1%} of texts, {policy['confident_accuracy']:.1%} "
        "of them correctly",
        f"- Answered from the nearest known question: {policy['answered_by_retrieval']:.1%}"
        + (f", {precision:.1%} correctly" if precision is not None else "")
        + (
            f" (similarity ≥ {threshold:.3f}, calibrated on validation for {spec.retrieval.target_precision:.0%} "
            "precision)"
            if threshold is not None
            else " (no similarity threshold reached the target precision on validation: retrieval never answers)"
        ),
        f"- Escalated to a person: {policy['escalated']:.1%} (without retrieval: "
        f"{policy['escalated_without_retrieval']:.1%}); accuracy of all automatic answers "
        f"{policy['answered_accuracy']:.1%}",
        "",
    ]


def write_report(evaluations: Sequence[Evaluation], dataset: DatasetRef, spec: ClassificationSpec) -> Path:
    """Model cards into each candidate's report folder, and the run's compression report; returns its folder."""
    rows = compression_rows(evaluations)
    table = markdown_table(rows)
    out = (
        settings.runs_dir()
        / dataset.domain
        / "reports"
        / f"compression-{value_fingerprint([e.candidate.fingerprint for e in evaluations], dataset.fingerprint)}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression_report.json").write_text(json.dumps(rows, indent=2))
    (out / "compression_report.md").write_text(f"# Compression report: {spec.name}\n\n{table}")
    plot_latency_vs_quality(rows, spec.primary_metric, out / "speed_vs_quality.png")
    for ev in evaluations:
        (Path(ev.report_dir) / "model_card.md").write_text(model_card(spec, ev, dataset, table))
    return out


@task(name="report")
def report(evaluations: list[Evaluation], dataset: DatasetRef, spec: ClassificationSpec) -> str:
    """Write model cards and the compression report, and show them in the Prefect UI."""
    from prefect.artifacts import (
        create_image_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    out = write_report(evaluations, dataset, spec)
    domain = dataset.domain
    create_table_artifact(
        json.loads((out / "compression_report.json").read_text()),
        key=artifact_key(domain, "compression-report"),
        description="Size, memory, speed and quality of every candidate; deltas against the fp32 parent",
    )
    create_image_artifact(
        png_data_uri(out / "speed_vs_quality.png"),
        key=artifact_key(domain, "speed-vs-quality"),
        description="Throughput vs test quality of this run's candidates",
    )
    for ev in evaluations:
        create_markdown_artifact(
            (Path(ev.report_dir) / "model_card.md").read_text(),
            key=artifact_key(domain, f"{ev.candidate.name}-model-card"),
            description=f"Model card of {ev.candidate.name}",
        )
    return str(out)
