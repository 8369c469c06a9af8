"""``domainflow``: run a domain's pipeline, inspect and roll back the registry, try a model.

Runs on Prefect's ephemeral server unless ``PREFECT_API_URL`` points at a real one,
so a fresh clone needs no running services.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

from domainflow.settings import configure_environment

configure_environment()  # before Prefect / Hugging Face read their settings

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from flows.console import make_console  # noqa: E402

app = typer.Typer(help="domainflow: turn a pretrained transformer into a deployed model for a business domain, as Prefect flows.", no_args_is_help=True, add_completion=False)
registry_app = typer.Typer(help="Inspect the model registry and roll back a domain's champion.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
console = make_console()


@app.command()
def run(
    domain: str = typer.Argument(..., help="Domain to run (see `domainflow domains`)."),
    model: Optional[str] = typer.Option(None, help="Base encoder: 'minilm' (default, offline), a local folder, or a hub name (needs DOMAINFLOW_ONLINE=1)."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the domain's train/test files (default: the shipped data)."),
    train_file: Optional[str] = typer.Option(None, help="Explicit training file (CSV, JSON/JSONL or Parquet); needs --test-file."),
    test_file: Optional[str] = typer.Option(None, help="Explicit test file; needs --train-file."),
    max_train_samples: Optional[int] = typer.Option(None, min=1, help="Stratified subsample of the training data (quick runs)."),
    max_test_samples: Optional[int] = typer.Option(None, min=1, help="Stratified subsample of the test data (quick runs)."),
    epochs: Optional[float] = typer.Option(None, min=0.01, help="Fine-tuning epochs (default: the domain's)."),
    seed: int = typer.Option(42, help="Seed for sampling, splitting and training."),
    num_layers: Optional[int] = typer.Option(None, min=1, help="Keep only the first N encoder layers (quick runs)."),
    refresh_cache: bool = typer.Option(False, "--refresh-cache", help="Recompute every step instead of reusing cached results."),
) -> None:
    """Run ingest → fine-tune → compress → evaluate → deploy for DOMAIN and print the candidates and the gate's decision."""
    from flows.pipeline import pipeline_for
    from tasks.ingest import DataValidationError

    _domain_spec(domain)
    started = time.perf_counter()
    try:
        summary = pipeline_for(domain)(
            domain=domain,
            model=model,
            data_dir=data_dir,
            train_file=train_file,
            test_file=test_file,
            max_train_samples=max_train_samples,
            max_test_samples=max_test_samples,
            epochs=epochs,
            seed=seed,
            num_layers=num_layers,
            refresh_cache=refresh_cache,
        )
    except DataValidationError as exc:
        _fail(f"data validation failed; nothing was trained and the registry is unchanged.\n{exc}")
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _print_summary(summary, time.perf_counter() - started)


def _print_summary(summary: dict, seconds: float) -> None:
    """The candidates, the gate's verdict on each with its reasons, and where the champion is."""
    rows = summary["candidates"]
    table = Table(title=f"{summary['domain']}: candidates (run took {seconds:.0f} s)")
    metric_columns = [c for c in (rows[0] if rows else {}) if c.startswith(("test_", "validation_"))]
    columns = summary.get("columns") or ["candidate", *metric_columns, "size_mb", "texts_per_second_batch1", "texts_per_second_batch32", "latency_ms_p50", "train_seconds"]
    headers = {"size_mb": "MB", "texts_per_second_batch1": "texts/s b1", "texts_per_second_batch32": "texts/s b32", "latency_ms_p50": "p50 ms", "train_seconds": "train s",
               "histories_per_second_batch32": "histories/s b32"}
    for column in columns:
        table.add_column(headers.get(column, column), justify="left" if column == "candidate" else "right")
    table.add_column("gate")
    for row in rows:
        cells = [f"{row[c]:.4f}" if c in metric_columns and row[c] is not None else ("–" if row[c] is None else str(row[c])) for c in columns]
        gate = "[bold green]chosen[/]" if row["chosen"] else ("[green]eligible[/]" if row["eligible"] else ("baseline" if row.get("role") == "baseline" else "[red]rejected[/]"))
        table.add_row(*cells, gate)
    console.print(table)
    for row in rows:
        console.print(f"  {row['candidate']}: {row['reasons']}", highlight=False)
    decision = summary["decision"]
    console.print(f"[bold]{decision['summary']}[/bold]", highlight=False)
    if summary.get("champion_dir"):
        console.print(f"champion: {summary['champion_dir']}", highlight=False)


@app.command()
def domains() -> None:
    """List the registered domains."""
    from domains import get_domain, list_domains

    for name in list_domains():
        spec = get_domain(name)
        console.print(f"[bold]{name}[/bold]: {spec.description} ({spec.num_labels} labels; primary metric {spec.primary_metric})")


@app.command()
def predict(
    domain: str = typer.Argument(..., help="Domain whose champion answers."),
    texts: list[str] = typer.Argument(..., help="One or more texts."),
    top_k: int = typer.Option(3, min=1, help="Labels to show per text."),
) -> None:
    """Classify TEXTS with the domain's champion and show what the domain would do with each prediction."""
    from domainflow.modeling import load_classifier
    from domainflow.registry import ModelRegistry, RegistryError
    from domainflow.retrieval import QuestionIndex
    from serving.inference import prediction_record, score_texts

    spec = _domain_spec(domain)
    if spec.task_kind != "text_classification":
        _fail(f"{domain} is a {spec.task_kind} domain: use `domainflow recommend --domain {domain} ITEM_ID ...`")
    try:
        champion = ModelRegistry(domain).champion()
    except RegistryError as exc:
        _fail(str(exc))
    if champion is None:
        _fail(f"no champion for {domain}: run `domainflow run {domain}` first")
    loaded = load_classifier(champion.model_dir)
    index = QuestionIndex.load(champion.model_dir) if spec.retrieval is not None else None
    results = [
        {"text": text, **prediction_record(spec, text, scores, top_k, ndigits=4)}
        for text, scores in zip(texts, score_texts(loaded, index, spec, list(texts), top_k))
    ]
    console.print_json(json.dumps({"domain": domain, "version": champion.version, "predictions": results}))


@app.command()
def recommend(
    history: Optional[list[str]] = typer.Argument(None, help="Item ids the user interacted with, oldest first."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Free text about what the user liked, read as the most recent history (repeatable)."),
    candidate: Optional[list[str]] = typer.Option(None, "--candidate", help="An item id to rank (repeatable; default: every item not in the history)."),
    top_k: int = typer.Option(10, min=1, max=100, help="How many items to show."),
    domain: str = typer.Option("recommendation", help="A ranking domain."),
) -> None:
    """Rank items for a history with the domain's champion: the same answer as POST /v1/DOMAIN/rank."""
    from domainflow.recsys.bundle import Recommender
    from domainflow.registry import ModelRegistry, RegistryError
    from domains import get_domain
    from serving.ranking import RANKING_TASKS, rank_record

    try:
        spec = get_domain(domain)
        champion = ModelRegistry(domain).champion()
    except (KeyError, RegistryError) as exc:
        _fail(str(exc).strip("'\""))
    if spec.task_kind not in RANKING_TASKS:
        _fail(f"{domain} is a {spec.task_kind} domain: use `domainflow predict {domain} TEXT`")
    if champion is None:
        _fail(f"no champion for {domain}: run `domainflow run {domain}` first")
    recommender = Recommender(champion.model_dir, spec.history_text)
    try:
        items = recommender.recommend(history=history or [], texts=text or [], candidates=candidate or None, k=top_k)
    except ValueError as exc:  # empty history, unknown item ids
        _fail(str(exc))
    console.print_json(json.dumps(rank_record(domain, champion.version, recommender.scorer_for(history or []), items, ndigits=4)))


@registry_app.command("list")
def registry_list(domain: str = typer.Argument(..., help="Domain.")) -> None:
    """List a domain's versions; the champion is marked."""
    from domainflow.registry import ModelRegistry

    registry = ModelRegistry(domain)
    champion = registry.champion()
    versions = registry.versions()
    if not versions:
        console.print(f"no versions registered for {domain}")
        return
    table = Table(title=f"{domain} registry")
    for column in ("version", "champion", "candidate", "created", "metrics"):
        table.add_column(column)
    for info in versions:
        metrics = info.metrics.get("test", info.metrics)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        table.add_row(str(info.version), "*" if champion and champion.version == info.version else "", str(info.lineage.get("candidate", "")), info.created_at, shown)
    console.print(table)


@registry_app.command("show")
def registry_show(domain: str = typer.Argument(..., help="Domain."), version: Optional[int] = typer.Option(None, help="Version (default: the champion).")) -> None:
    """Show one version's metrics, lineage and location."""
    from domainflow.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(domain)
    try:
        info = registry.get(version) if version is not None else registry.champion()
    except RegistryError as exc:
        _fail(str(exc))
    if info is None:
        _fail(f"no champion for {domain}")
    console.print_json(json.dumps({"version": info.version, "path": str(info.path), "created_at": info.created_at, "metrics": info.metrics, "lineage": info.lineage}, default=str))


@registry_app.command("history")
def registry_history(domain: str = typer.Argument(..., help="Domain.")) -> None:
    """Every promotion, rejection and rollback, oldest first."""
    from domainflow.registry import ModelRegistry

    for event in ModelRegistry(domain).history():
        console.print_json(json.dumps(event, default=str))


@registry_app.command("rollback")
def registry_rollback(
    domain: str = typer.Argument(..., help="Domain."),
    to: Optional[int] = typer.Option(None, "--to", help="Version to restore (default: the previous champion)."),
    reason: str = typer.Option("manual rollback", help="Why, for the history."),
) -> None:
    """Make an earlier version the champion again (atomic; recorded in the history)."""
    from domainflow.registry import ModelRegistry, RegistryError

    try:
        info = ModelRegistry(domain).rollback(to, reason=reason)
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"{domain}: champion is now version {info.version} ({info.path})")


def _domain_spec(domain: str):  # noqa: ANN202 - DomainSpec, imported lazily to keep --help fast
    """The registered domain, or a clear error listing the known ones."""
    from domains import get_domain

    try:
        return get_domain(domain)
    except KeyError as exc:
        _fail(str(exc).strip("'\""))


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code=2)


def _register_operations() -> None:
    """serve / schedule / ui (flows/ops_cli.py) and the monitoring sub-commands (flows/monitor_cli.py)."""
    from flows.monitor_cli import monitor_app
    from flows.ops_cli import schedule, serve, ui

    app.command()(serve)
    app.command()(schedule)
    app.command()(ui)
    app.add_typer(monitor_app, name="monitor")


_register_operations()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
