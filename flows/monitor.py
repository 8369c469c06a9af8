"""Sentiment monitoring: score new items with the champion, keep them, watch each topic for surges.

``monitor_batch`` is one batch file, start to end::

    champion ─┐
    prepare (validate, ids, topics → Parquet) → score (only ids not stored yet, chunked commits)
        → find surges (per topic × window counts, each touched window vs its own baseline)
        → for each new surge: Prefect event, Markdown + table + trend-plot artifacts,
          optional webhook POST (retried; a webhook that stays down is logged, never fatal)
        → mark the batch complete

Everything a step hands on is a path or a small record (``BatchRef``, ``ScoreResult``,
``Surge``); the items themselves live in the store (``domainflow.monitoring.store``),
which is what makes a rerun cheap and exact: a completed batch is skipped, an
interrupted one scores only what is missing, and an alert is announced once per topic
and window. Alerts are announced *before* they are recorded, so a crash in between
announces again rather than never (at least once, never lost).

``monitor_inbox`` runs ``monitor_batch`` on every file of a folder and is what a
schedule runs (``build_monitor_deployment``); ``replay`` feeds a built stream with an
injected surge through ``monitor_batch`` and says whether exactly that surge was raised.

Nothing here names a domain: the negative label, keyword map and thresholds come from
the domain's spec (its ``monitoring`` field), overridden by a config file or parameters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from domainflow.settings import configure_environment

configure_environment()  # before Prefect / Hugging Face read their settings

import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from domainflow.fingerprint import file_digest, value_fingerprint  # noqa: E402
from domainflow.monitoring.aggregation import TOPIC, TOTAL, WINDOW, share_column, window_counts, window_grid  # noqa: E402
from domainflow.monitoring.batch import BatchValidationError, read_batch  # noqa: E402
from domainflow.monitoring.config import MonitorConfig, WebhookSettings, build_config, read_config_file  # noqa: E402
from domainflow.monitoring.store import ScoreStore, default_store_path  # noqa: E402
from domainflow.monitoring.surge import Surge, baseline_frame, detect_surges  # noqa: E402
from domainflow.monitoring.topics import TopicExtractor  # noqa: E402
from domainflow.monitoring.webhook import Delivery, deliver, redact  # noqa: E402
from domainflow.pii import PiiMode  # noqa: E402

BATCH_SUFFIXES = (".csv", ".json", ".jsonl", ".ndjson", ".parquet")
SURGE_EVENT = "domainflow.sentiment.surge"


class MonitorError(RuntimeError):
    """The monitor cannot run: no champion, a domain without monitoring settings, a missing file."""


class ChampionRef(BaseModel):
    domain: str
    version: int
    model_dir: str


class BatchRef(BaseModel):
    """A validated batch, normalised to Parquet (item_id, ts, text, topics, source)."""

    source: str
    path: str
    fingerprint: str
    rows: int
    duplicates_in_file: int
    windows: list[str]  # ISO starts of the windows the batch's items fall in
    untagged: int  # items with no topic (stored, but in no topic's counts)


class ScoreResult(BaseModel):
    inserted: int
    already_stored: int


class SurgeScan(BaseModel):
    surges: list[Surge]
    counts_path: str | None


# ------------------------------------------------------------------------------ configuration


def resolve_config(domain: str, config: dict[str, Any] | None = None, config_file: str | None = None) -> MonitorConfig:
    """The domain's monitoring defaults, then the config file, then ``config`` (parameters) on top."""
    from domainflow.catalog import get_domain

    spec = get_domain(domain)
    defaults = getattr(spec, "monitoring", None)
    if not isinstance(defaults, MonitorConfig):
        raise MonitorError(
            f"domain {domain!r} defines no monitoring (its spec has no `monitoring: MonitorConfig` field)"
        )
    merged = build_config(defaults, read_config_file(config_file)) if config_file else defaults
    merged = build_config(merged, config) if config else merged
    labels = domain_labels(domain)
    if merged.negative_label not in labels:
        raise MonitorError(f"negative label {merged.negative_label!r} is not a label of {domain} ({', '.join(labels)})")
    return merged


def domain_labels(domain: str) -> list[str]:
    """The labels a monitored domain declares (its monitoring settings name one of them as the negative label)."""
    from domainflow.catalog import get_domain

    labels = getattr(get_domain(domain), "label_names", None)
    if labels is None:
        raise MonitorError(f"domain {domain!r} declares no labels; monitoring needs them (`labels = [...]`)")
    return list(labels)


def store_for(domain: str, store_path: str | None) -> ScoreStore:
    return ScoreStore(Path(store_path) if store_path else default_store_path(domain))


def pii_setting(domain: str) -> PiiMode:
    """The domain's ``pii`` setting (domainflow/pii.py): texts are masked before the store sees them."""
    from domainflow.catalog import get_domain

    mode: PiiMode = getattr(get_domain(domain), "pii", "off")  # a classification domain's setting
    return mode


def batch_fingerprint(batch_file: str | Path, config: MonitorConfig, pii: str = "off") -> str:
    """The file's bytes plus what turns them into stored items (topic rules, personal data masked or not)."""
    masking = [pii] if pii != "off" else []  # unchanged keys for stores filled before the setting existed
    return value_fingerprint("monitor-batch", file_digest(Path(batch_file)), config.keywords, config.cashtags, *masking)


# ------------------------------------------------------------------------------ tasks


@task(name="champion", cache_policy=NO_CACHE)
def champion_for(domain: str) -> ChampionRef:
    """The domain's serving model; a missing champion is an error that says how to make one."""
    from domainflow.registry import ModelRegistry

    registry = ModelRegistry(domain)
    champion = registry.load_champion()  # its files checked against the version's manifest
    if champion is None:
        raise MonitorError(
            f"no champion for {domain!r} in {registry.root}: {registry.no_champion_hint()} (monitoring scores "
            "with the deployed model)"
        )
    return ChampionRef(domain=domain, version=champion.version, model_dir=str(champion.model_dir))


@task(name="prepare-batch", cache_policy=NO_CACHE)
def prepare_batch(
    batch_file: str, config: MonitorConfig, fingerprint: str, store_path: str, pii: PiiMode = "off"
) -> BatchRef:
    """Validate the file, mask personal data (``pii``), give each item its id and topics, and write them as
    Parquet beside the store."""
    source = Path(batch_file)
    items, duplicates = read_batch(source, TopicExtractor(config.keywords, config.cashtags), pii)
    frame = pd.DataFrame(
        {
            "item_id": [i.item_id for i in items],
            "ts": pd.to_datetime([i.timestamp for i in items], utc=True),
            "text": [i.text for i in items],
            "topics": [i.topics for i in items],
            "source": [i.source for i in items],
        }
    )
    out = Path(store_path).parent / "batches" / f"{fingerprint}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    windows = sorted({w.isoformat() for w in frame["ts"].dt.floor(config.surge.window)})
    untagged = int(sum(1 for i in items if not i.topics))
    get_run_logger().info(
        "%s: %d items (%d duplicate rows dropped, %d without topic) in %d window(s)",
        source.name,
        len(items),
        duplicates,
        untagged,
        len(windows),
    )
    return BatchRef(
        source=str(source.resolve()),
        path=str(out),
        fingerprint=fingerprint,
        rows=len(items),
        duplicates_in_file=duplicates,
        windows=windows,
        untagged=untagged,
    )


@task(name="score-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def score_batch(batch: BatchRef, champion: ChampionRef, store_path: str, chunk_size: int) -> ScoreResult:
    """Score the items the store does not hold yet and append them (retried: SQLite may be busy; reruns are exact)."""
    from domainflow.monitoring.scoring import score_frame

    log = get_run_logger()
    store = ScoreStore(store_path)
    store.start_batch(batch.fingerprint, batch.source, batch.rows)
    items = pd.read_parquet(batch.path)
    counts = score_frame(
        store,
        items,
        champion.model_dir,
        model_version=champion.version,
        batch=batch.fingerprint,
        chunk_size=chunk_size,
        progress=lambda done, total: log.info("scored %d/%d new items", done, total),
    )
    log.info(
        "stored %d new items with champion v%d; %d were already stored",
        counts.inserted,
        champion.version,
        counts.already_stored,
    )
    return ScoreResult(inserted=counts.inserted, already_stored=counts.already_stored)


@task(name="find-surges", cache_policy=NO_CACHE)
def find_surges(
    store_path: str, windows: list[str], config: MonitorConfig, labels: list[str], fingerprint: str
) -> SurgeScan:
    """Counts per topic and window over the touched windows and their baselines; the surges among the
    touched windows."""
    store = ScoreStore(store_path)
    span = store.time_range()
    if span is None or not windows:
        return SurgeScan(surges=[], counts_path=None)
    rule = config.surge
    touched = [pd.Timestamp(w) for w in windows]
    first = max(span[0].floor(rule.window), min(touched) - rule.baseline_windows * rule.window_delta)
    grid = window_grid(first, max(touched), rule.window)
    items = store.items_between(grid[0], grid[-1] + rule.window_delta)
    counts = window_counts(items, rule.window, labels, grid)
    out = Path(store_path).parent / "aggregates" / f"{fingerprint}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    counts.to_parquet(out, index=False)
    surges = detect_surges(counts, touched, rule, config.negative_label) if len(counts) else []
    get_run_logger().info(
        "checked %d window(s) × %d topic(s) against %d-window baselines: %d surge(s)",
        len(touched),
        counts[TOPIC].nunique() if len(counts) else 0,
        rule.baseline_windows,
        len(surges),
    )
    return SurgeScan(surges=surges, counts_path=str(out))


def alert_key(domain: str, topic: str) -> str:
    """Artifact key of a topic's alerts ('$BRK.B' -> 'finance-sentiment-surge-brk-b'); each new alert is
    a new version."""
    from tasks.artifacts import artifact_key

    return artifact_key(domain, "surge-" + re.sub(r"[^a-z0-9]+", "-", topic.lower()).strip("-"))


def alert_payload(domain: str, surge: Surge, champion: ChampionRef) -> dict[str, Any]:
    """What an alert says, the same in the event, the webhook and the store."""
    payload = {
        "domain": domain,
        "model_version": champion.version,
        "summary": surge.summary(),
        **surge.model_dump(mode="json"),
    }
    for key in ("window_start", "window_end"):  # one spelling everywhere: 2024-03-04T08:00:00+00:00
        payload[key] = pd.Timestamp(getattr(surge, key)).isoformat()
    return payload


@task(name="announce-surge", cache_policy=NO_CACHE)
def announce_surge(
    domain: str,
    surge: Surge,
    counts_path: str,
    labels: list[str],
    config: MonitorConfig,
    champion: ChampionRef,
    store_path: str,
) -> dict[str, Any]:
    """A Prefect event, and Markdown, table and trend-plot artifacts for one surge."""
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
    from prefect.events import emit_event

    from domainflow.monitoring.plots import plot_trend
    from tasks.artifacts import png_data_uri

    payload = alert_payload(domain, surge, champion)
    emit_event(
        event=SURGE_EVENT,
        resource={
            "prefect.resource.id": f"domainflow.{domain}.topic.{surge.topic}",
            "prefect.resource.name": surge.topic,
            "domainflow.domain": domain,
        },
        payload=payload,
    )
    counts = pd.read_parquet(counts_path)
    rows = baseline_frame(counts, surge, config.surge)
    key = alert_key(domain, surge.topic)
    stamp = pd.Timestamp(surge.window_start).strftime("%Y%m%dT%H%M")
    plot = plot_trend(rows, surge, labels, Path(store_path).parent / "alerts" / f"{key}-{stamp}.png")
    create_markdown_artifact(
        alert_markdown(domain, surge, config, champion),
        key=key,
        description=f"{surge.negative_label} surge on {surge.topic}",
    )
    table = [
        {
            "window_start": pd.Timestamp(r[WINDOW]).isoformat(),
            "total": int(r[TOTAL]),
            **{label: int(r[label]) for label in labels},
            f"share_{surge.negative_label}": None
            if pd.isna(r[share_column(surge.negative_label)])
            else round(float(r[share_column(surge.negative_label)]), 3),
            "surge": pd.Timestamp(r[WINDOW]) == pd.Timestamp(surge.window_start),
        }
        for _, r in rows.iterrows()
    ]
    create_table_artifact(
        table, key=f"{key}-windows", description=f"{surge.topic}: counts per window, baseline and surge window"
    )
    create_image_artifact(
        png_data_uri(plot), key=f"{key}-trend", description=f"{surge.topic}: trend with the threshold it crossed"
    )
    return payload


def alert_markdown(domain: str, surge: Surge, config: MonitorConfig, champion: ChampionRef) -> str:
    rule = config.surge
    share_line = (
        f"| {surge.negative_label} share | {surge.share:.0%} | {surge.baseline_share_mean:.0%} ± "
        f"{surge.baseline_share_std:.0%} | {surge.share_threshold:.0%} |"
        if surge.share_threshold is not None
        else f"| {surge.negative_label} share | {surge.share:.0%} | – | – (too few windows with items) |"
    )
    return (
        "\n".join(
            [
                f"# Surge: {surge.topic} ({domain})",
                "",
                f"**{surge.negative_count} {surge.negative_label}** of {surge.total} items in the window "
                f"**{pd.Timestamp(surge.window_start):%Y-%m-%d %H:%M}–{pd.Timestamp(surge.window_end):%H:%M} UTC**; "
                f"rule(s) fired: {', '.join(surge.rules)}.",
                "",
                "| measure | this window | baseline (mean ± std) | threshold |",
                "|---|---:|---:|---:|",
                f"| {surge.negative_label} count | {surge.negative_count} | {surge.baseline_mean:.2f} ± "
                f"{surge.baseline_std:.2f} | {surge.count_threshold:.2f} |",
                share_line,
                "",
                f"Baseline: the previous {surge.baseline_windows} windows of {rule.window} (silent windows count as "
                "0). "
                f"Rule: at least {rule.min_count} {surge.negative_label} items and count > mean + {rule.k:g}·std + "
                f"{rule.min_excess:g}, "
                f"or share > mean + {rule.k:g}·std + {rule.min_share_excess:g}. Scored by champion "
                f"v{champion.version}.",
            ]
        )
        + "\n"
    )


@task(name="post-webhook", cache_policy=NO_CACHE)
def post_webhook(url: str, payload: dict[str, Any], settings: WebhookSettings) -> Delivery:
    """The tries are made by ``deliver``, not by Prefect's retries: only it knows that a 4xx or a refused
    address is final and that all tries share one deadline. The URL's path stays out of the logs."""
    log = get_run_logger()
    log.info("posting alert %s/%s to %s", payload.get("topic"), payload.get("window_start"), redact(url))
    return deliver(url, payload, settings, logger=log)


def _latest_overview(counts_path: str | None, negative: str, limit: int = 20) -> list[dict[str, Any]]:
    """The busiest topics of the newest window (the artifact a person glances at)."""
    if not counts_path:
        return []
    counts = pd.read_parquet(counts_path)
    if counts.empty:
        return []
    latest = counts[counts[WINDOW] == counts[WINDOW].max()].sort_values([TOTAL, negative], ascending=False).head(limit)
    return [
        {
            "topic": r[TOPIC],
            "window_start": pd.Timestamp(r[WINDOW]).isoformat(),
            "total": int(r[TOTAL]),
            negative: int(r[negative]),
            f"share_{negative}": None
            if pd.isna(r[share_column(negative)])
            else round(float(r[share_column(negative)]), 3),
        }
        for _, r in latest.iterrows()
        if r[TOTAL] > 0
    ]


# ------------------------------------------------------------------------------ flows


@flow(name="sentiment-monitor", log_prints=True)
def monitor_batch(
    batch_file: str,
    domain: str = "finance_sentiment",
    config: dict[str, Any] | None = None,
    config_file: str | None = None,
    store_path: str | None = None,
) -> dict[str, Any]:
    """Score one batch file with the domain's champion, store it, and raise alerts for topic surges.

    Args:
        batch_file: CSV, JSON/JSONL or Parquet with ``timestamp`` and ``text`` (optional ``topic``, ``id``).
        domain: a domain whose spec has monitoring settings (default finance_sentiment).
        config: overrides of the monitoring settings, e.g. ``{"surge": {"window": "1D", "min_count": 8}}``.
        config_file: a TOML or JSON file of overrides (applied before ``config``).
        store_path: the SQLite store (default ``<home>/monitoring/<domain>/scores.sqlite``).
    """

    log = get_run_logger()
    settings_ = resolve_config(domain, config, config_file)
    labels = domain_labels(domain)
    store = store_for(domain, store_path)
    source = Path(batch_file)
    if not source.is_file():
        raise MonitorError(f"batch file {source} does not exist")
    pii = pii_setting(domain)
    fingerprint = batch_fingerprint(source, settings_, pii)
    summary: dict[str, Any] = {
        "domain": domain,
        "batch": str(source),
        "fingerprint": fingerprint,
        "store": str(store.path),
    }
    if store.batch_completed(fingerprint):
        log.info("%s was already processed completely (fingerprint %s): nothing to add", source.name, fingerprint)
        return {
            **summary,
            "already_processed": True,
            "rows": 0,
            "inserted": 0,
            "already_stored": 0,
            "alerts": [],
            "known_alerts": [],
        }

    champion = champion_for(domain)
    batch = prepare_batch(str(source), settings_, fingerprint, str(store.path), pii)
    scored = score_batch(batch, champion, str(store.path), settings_.score_chunk_size)
    scan = find_surges(str(store.path), batch.windows, settings_, labels, fingerprint)

    alerts, known = [], []
    url = settings_.webhook.resolved_url()
    for surge in scan.surges:
        if store.alert_exists(surge.topic, pd.Timestamp(surge.window_start)):
            known.append(surge.model_dump(mode="json"))
            continue
        assert scan.counts_path is not None  # a scan that found surges has written its counts
        payload = announce_surge(domain, surge, scan.counts_path, labels, settings_, champion, str(store.path))
        print(f"SURGE {surge.summary()} (artifact {alert_key(domain, surge.topic)})")
        notified = "no webhook configured"
        if url:
            state = post_webhook(url, payload, settings_.webhook, return_state=True)
            delivery: Delivery | None = state.result() if state.is_completed() else None
            notified = delivery.summary() if delivery else f"failed: {state.message or state.name}"
            if delivery is None or not delivery.delivered:
                log.error(
                    "webhook for the %s alert: %s; the alert is recorded and shown as an artifact",
                    surge.topic,
                    notified,
                )
        store.record_alert(surge.topic, pd.Timestamp(surge.window_start), payload, notified)
        alerts.append({**payload, "artifact": alert_key(domain, surge.topic), "webhook": notified})
    store.complete_batch(fingerprint, scored.inserted)

    overview = _latest_overview(scan.counts_path, settings_.negative_label)
    if overview:
        from prefect.artifacts import create_table_artifact

        from tasks.artifacts import artifact_key

        create_table_artifact(
            overview,
            key=artifact_key(domain, "monitor-latest-window"),
            description=f"Busiest topics of the newest window after {source.name}",
        )
    log.info(
        "%s: %d items, %d new in the store, %d new alert(s)", source.name, batch.rows, scored.inserted, len(alerts)
    )
    return {
        **summary,
        "already_processed": False,
        "champion_version": champion.version,
        "rows": batch.rows,
        "duplicates_in_file": batch.duplicates_in_file,
        "untagged": batch.untagged,
        "inserted": scored.inserted,
        "already_stored": scored.already_stored,
        "windows": batch.windows,
        "alerts": alerts,
        "known_alerts": known,
    }


def inbox_files(inbox: str | Path) -> list[Path]:
    """Batch files of a folder, oldest first (modification time, then name); hidden and partial files are skipped."""
    folder = Path(inbox)
    if not folder.is_dir():
        raise MonitorError(f"inbox {folder} is not a folder")
    files = [
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


@flow(name="sentiment-monitor-inbox", log_prints=True)
def monitor_inbox(
    inbox: str,
    domain: str = "finance_sentiment",
    config: dict[str, Any] | None = None,
    config_file: str | None = None,
    store_path: str | None = None,
) -> dict[str, Any]:
    """Process every batch file in ``inbox`` (completed ones are skipped at once): what a schedule runs.

    A bad file is reported and the others still processed; the run fails at the end if any file failed.
    """
    log = get_run_logger()
    results, failures = [], []
    for path in inbox_files(inbox):
        try:
            results.append(
                monitor_batch(str(path), domain=domain, config=config, config_file=config_file, store_path=store_path)
            )
        except (BatchValidationError, MonitorError) as exc:
            log.error("%s: %s", path.name, exc)
            failures.append(str(exc) if path.name in str(exc) else f"{path.name}: {exc}")
    alerts = [a for r in results for a in r["alerts"]]
    if failures:
        raise MonitorError(
            f"{len(failures)} of {len(failures) + len(results)} batch file(s) failed:\n- " + "\n- ".join(failures)
        )
    return {"inbox": inbox, "files": len(results), "new_items": sum(r["inserted"] for r in results), "alerts": alerts}


@flow(name="sentiment-monitor-replay", log_prints=True)
def replay(
    domain: str = "finance_sentiment",
    source: str | None = None,
    out_dir: str | None = None,
    ticker: str | None = None,
    window: str = "1h",
    windows: int = 48,
    surge_window: int = 40,
    surge_size: int = 12,
    windows_per_batch: int = 1,
    limit: int | None = None,
    seed: int = 7,
    config: dict[str, Any] | None = None,
    store_path: str | None = None,
) -> dict[str, Any]:
    """Replay a labelled file (default: the domain's test file) as a timed stream with one injected
    surge, through ``monitor_batch`` batch by batch, into a fresh store; report whether exactly the
    injected alert was raised.
    """
    import tempfile

    from domainflow import settings
    from domainflow.catalog import get_domain
    from domainflow.monitoring.replay import build_replay

    spec = get_domain(domain)
    source = source or str(spec.source.resolve()["test"])
    if out_dir:
        run_dir = Path(out_dir)
    else:  # a fresh folder, so a fresh store, per replay
        base = settings.home() / "monitoring" / domain
        base.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix="replay-", dir=base))
    plan = build_replay(
        source,
        run_dir / "stream",
        text_column=spec.text_column,
        ticker=ticker,
        window=window,
        windows=windows,
        surge_window=surge_window,
        surge_size=surge_size,
        windows_per_batch=windows_per_batch,
        limit=limit,
        seed=seed,
    )
    store = str(Path(store_path) if store_path else run_dir / "replay.sqlite")
    overrides = dict(config or {})
    overrides["surge"] = {**overrides.get("surge", {}), "window": window}
    print(
        f"replaying {plan.items} items from {source} over {windows} × {window} in {len(plan.files)} batch(es); "
        f"injected: {plan.surge_items} {resolve_config(domain, overrides).negative_label} items on {plan.ticker} at "
        f"{plan.surge_window.isoformat()}"
    )
    raised = []
    for path in plan.files:
        result = monitor_batch(str(path), domain=domain, config=overrides, store_path=store)
        raised.extend(result["alerts"])
    got = {(a["topic"], pd.Timestamp(a["window_start"])) for a in raised}
    expected = plan.expected()
    matched = got == expected
    verdict = (
        "exactly the injected alert was raised"
        if matched
        else f"MISMATCH: expected {sorted((t, w.isoformat()) for t, w in expected)}"
    )
    print(f"replay done: {len(raised)} alert(s) {sorted((t, w.isoformat()) for t, w in got)}; {verdict}")
    return {
        "ticker": plan.ticker,
        "surge_window": plan.surge_window.isoformat(),
        "items": plan.items,
        "batches": len(plan.files),
        "alerts": raised,
        "matched": matched,
        "store": store,
        "stream_dir": str(run_dir / "stream"),
    }


def build_monitor_deployment(
    domain: str,
    inbox: str,
    *,
    cron: str | None = None,
    interval_seconds: float | None = None,
    timezone: str = "UTC",
    config_file: str | None = None,
    store_path: str | None = None,
) -> Any:
    """A ``monitor-<domain>`` deployment of :func:`monitor_inbox` on a cron or an interval, like retraining's."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval, Schedule

    if (cron is None) == (interval_seconds is None):
        raise ValueError("give exactly one of cron or interval_seconds")
    resolve_config(domain, None, config_file)  # fail now, not at 3 a.m.: unknown domain, no monitoring, bad config file
    if cron:
        schedule: Schedule = Cron(cron, timezone=timezone)
    elif interval_seconds is not None:
        schedule = Interval(interval_seconds, timezone=timezone)
    else:
        raise ValueError("give exactly one of cron or interval_seconds")
    parameters = {
        "inbox": str(Path(inbox).resolve()),
        "domain": domain,
        "config_file": str(Path(config_file).resolve()) if config_file else None,
        "store_path": store_path,
    }
    return monitor_inbox.to_deployment(
        name=f"monitor-{domain}",
        schedule=schedule,
        parameters={k: v for k, v in parameters.items() if v is not None},
        description=f"Score new files in {inbox} with the {domain} champion and alert on topic surges.",
        tags=["domainflow", "monitor", domain],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
