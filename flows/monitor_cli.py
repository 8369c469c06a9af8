"""``domainflow monitor …``: score new items, replay a stream with an injected surge, list alerts, schedule.

A typer sub-app, wired into the main CLI with ``app.add_typer(monitor_app, name="monitor")``;
it also runs on its own: ``python -m flows.monitor_cli COMMAND``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from domainflow.settings import configure_environment

configure_environment()  # before Prefect / Hugging Face read their settings

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from flows.console import domain_name, make_console  # noqa: E402

monitor_app = typer.Typer(
    help="Sentiment monitoring: score new items with the champion, watch topics, alert on surges.",
    no_args_is_help=True,
    add_completion=False,
)
console = make_console()
DEFAULT_PREFECT_PORT = 4200


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def _overrides(
    window: str | None, baseline_windows: int | None, k: float | None, min_count: int | None, webhook_url: str | None
) -> dict[str, Any]:
    """Command-line options as config overrides (only those given)."""
    surge = {
        key: value
        for key, value in {
            "window": window,
            "baseline_windows": baseline_windows,
            "k": k,
            "min_count": min_count,
        }.items()
        if value is not None
    }
    overrides: dict[str, Any] = {"surge": surge} if surge else {}
    if webhook_url:
        overrides["webhook"] = {"url": webhook_url}
    return overrides


def _errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from domainflow.monitoring.batch import BatchValidationError
    from domainflow.registry import RegistryError
    from flows.monitor import MonitorError

    return (MonitorError, BatchValidationError, RegistryError, FileNotFoundError, ValueError, ValidationError, KeyError)


def _print_alerts(alerts: list[dict[str, Any]], title: str) -> None:
    """One row per alert: topic, window, what was seen against the baseline, where it was sent."""
    if not alerts:
        console.print(f"{title}: none")
        return
    table = Table(title=title)
    for column in ("topic", "window (UTC)", "negative / total", "baseline", "threshold", "rule", "artifact / webhook"):
        table.add_column(column, justify="right" if column in {"threshold"} else "left")
    for a in alerts:
        where = " · ".join(str(x) for x in (a.get("artifact"), a.get("webhook") or a.get("notified")) if x)
        table.add_row(
            a["topic"],
            str(a["window_start"])[:16].replace("T", " "),
            f"{a['negative_count']} {a['negative_label']} / {a['total']} ({a['share']:.0%})",
            f"{a['baseline_mean']:.2f} ± {a['baseline_std']:.2f}",
            f"{a['count_threshold']:.2f}",
            ",".join(a["rules"]),
            where,
        )
    console.print(table)


@monitor_app.command()
def score(
    domain: str = typer.Argument(
        ..., help="Domain whose champion scores the items (a name or a domain file), e.g. finance_sentiment."
    ),
    path: Path = typer.Argument(
        ..., help="A batch file (CSV, JSON/JSONL, Parquet: timestamp, text[, topic, id]) or a folder of them."
    ),
    config: Path | None = typer.Option(
        None, help="TOML or JSON file of monitoring settings (keywords, surge rule, webhook)."
    ),
    window: str | None = typer.Option(None, help="Aggregation window, e.g. 15min, 1h, 1D (default: the domain's)."),
    baseline_windows: int | None = typer.Option(None, min=1, help="Previous windows forming each topic's baseline."),
    k: float | None = typer.Option(None, min=0.0, help="Standard deviations above the baseline mean."),
    min_count: int | None = typer.Option(None, min=1, help="Negative items a window needs before it can be a surge."),
    webhook_url: str | None = typer.Option(
        None,
        help=(
            "POST each new alert here (else $DOMAINFLOW_MONITOR_WEBHOOK_URL; "
            "that keeps a secret URL out of run parameters)."
        ),
    ),
    store: Path | None = typer.Option(None, help="SQLite store (default: <home>/monitoring/DOMAIN/scores.sqlite)."),
) -> None:
    """Score new items with the champion, store them (idempotent), and alert on topic surges."""
    domain = domain_name(domain)
    from flows.monitor import monitor_batch, monitor_inbox
    from flows.prefect_server import tether_ephemeral_server

    tether_ephemeral_server()

    overrides = _overrides(window, baseline_windows, k, min_count, webhook_url) or None
    try:
        if path.is_dir():
            result = monitor_inbox(
                str(path),
                domain=domain,
                config=overrides,
                config_file=str(config) if config else None,
                store_path=str(store) if store else None,
            )
            console.print(f"{result['files']} file(s), {result['new_items']} new item(s)")
        else:
            result = monitor_batch(
                str(path),
                domain=domain,
                config=overrides,
                config_file=str(config) if config else None,
                store_path=str(store) if store else None,
            )
            if result["already_processed"]:
                console.print(f"{path.name} was already processed: nothing added")
            else:
                console.print(
                    f"{path.name}: {result['rows']} item(s), {result['inserted']} new, {result['already_stored']} "
                    "already stored; "
                    f"champion v{result['champion_version']}; store {result['store']}",
                    highlight=False,
                )
    except _errors() as exc:
        _fail(str(exc).strip("'\""))
    _print_alerts(result["alerts"], "new alerts")


@monitor_app.command("replay")
def replay_command(
    domain: str = typer.Argument(
        ..., help="Domain whose champion scores the stream (a name or a domain file), e.g. finance_sentiment."
    ),
    source: Path | None = typer.Option(
        None, help="File to replay (default: the domain's test file, for finance the valid split)."
    ),
    ticker: str | None = typer.Option(
        None, help="Ticker of the injected surge (default: the file's most frequent cashtag)."
    ),
    window: str = typer.Option("1h", help="Window length."),
    windows: int = typer.Option(48, min=2, help="Windows the stream spans."),
    surge_window: int = typer.Option(40, min=0, help="Window (0-based) that gets the injected surge."),
    surge_size: int = typer.Option(12, min=1, help="Negative items injected."),
    windows_per_batch: int = typer.Option(1, min=1, help="Windows per batch file fed to the monitor."),
    limit: int | None = typer.Option(None, min=1, help="Replay only the first N items of the shuffled file."),
    seed: int = typer.Option(7, help="Seed of the shuffle and the timing."),
    out_dir: Path | None = typer.Option(
        None, help="Folder for the stream files and the replay's own store (default: a fresh folder under the home)."
    ),
) -> None:
    """Replay a labelled file as a timed stream with one injected negative surge.

    Exits 1 unless exactly that alert is raised."""
    domain = domain_name(domain)
    from flows.monitor import replay
    from flows.prefect_server import tether_ephemeral_server

    tether_ephemeral_server()

    try:
        result = replay(
            domain=domain,
            source=str(source) if source else None,
            out_dir=str(out_dir) if out_dir else None,
            ticker=ticker,
            window=window,
            windows=windows,
            surge_window=surge_window,
            surge_size=surge_size,
            windows_per_batch=windows_per_batch,
            limit=limit,
            seed=seed,
        )
    except _errors() as exc:
        _fail(str(exc).strip("'\""))
    _print_alerts(
        result["alerts"], f"alerts raised by the replay ({result['batches']} batches, {result['items']} items)"
    )
    if result["matched"]:
        console.print(
            f"[bold green]OK[/]: exactly the injected surge was detected: {result['ticker']} in the window starting "
            f"{result['surge_window']}",
            highlight=False,
        )
    else:
        console.print(
            f"[bold red]MISMATCH[/]: injected {result['ticker']} at {result['surge_window']}; see the alerts above",
            highlight=False,
        )
        raise typer.Exit(code=1)


@monitor_app.command()
def alerts(
    domain: str = typer.Argument(..., help="Domain (a name or a domain file)."),
    store: Path | None = typer.Option(None, help="SQLite store (default: <home>/monitoring/DOMAIN/scores.sqlite)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the alerts recorded in the store, oldest first."""
    domain = domain_name(domain)
    from flows.monitor import store_for

    path = Path(store) if store else None
    if path is not None and not path.is_file():
        _fail(f"no store at {path}")
    recorded = store_for(domain, str(path) if path else None).alerts()
    if as_json:
        console.print_json(json.dumps(recorded, default=str))
    else:
        _print_alerts(recorded, f"{domain}: recorded alerts")


@monitor_app.command()
def schedule(
    domain: str = typer.Argument(..., help="Domain (a name or a domain file)."),
    inbox: Path = typer.Option(..., help="Folder the schedule scans for new batch files."),
    cron: str | None = typer.Option(None, help='Cron schedule, e.g. "*/15 * * * *".'),
    every: float | None = typer.Option(None, min=1.0, help="Or: run every N seconds."),
    timezone: str = typer.Option("UTC", help="IANA time zone of a cron schedule."),
    config: Path | None = typer.Option(None, help="TOML or JSON file of monitoring settings."),
    api_url: str | None = typer.Option(
        None, help=f"Prefect API (default: PREFECT_API_URL, else http://127.0.0.1:{DEFAULT_PREFECT_PORT}/api)."
    ),
) -> None:
    """Create a monitor-DOMAIN deployment that scans INBOX on a schedule, and run it when due (keeps running)."""
    domain = domain_name(domain)
    import httpx
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.monitor import build_monitor_deployment

    api_url = api_url or os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{DEFAULT_PREFECT_PORT}/api"
    try:
        healthy = httpx.get(api_url.rstrip("/") + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        _fail(
            f"no Prefect server answers at {api_url}: start one with `domainflow ui` (or set PREFECT_API_URL / "
            "--api-url)"
        )
    os.environ["PREFECT_API_URL"] = api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            deployment = build_monitor_deployment(
                domain,
                str(inbox),
                cron=cron,
                interval_seconds=every,
                timezone=timezone,
                config_file=str(config) if config else None,
            )
        except _errors() as exc:
            _fail(str(exc).strip("'\""))
        typer.echo(f"scheduling {deployment.name} on {cron or f'every {every:g} s'} at {api_url}")
        prefect_serve(deployment)


if __name__ == "__main__":
    monitor_app()
