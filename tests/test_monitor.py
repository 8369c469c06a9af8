"""Sentiment monitoring: topics, batch validation, the idempotent store, surge rules, webhook, replay.

The rules are tested as pure functions on hand-made counts; the flow is tested end to end
with the tiny finance champion (real MiniLM cut to two layers, trained on real rows) and a
real HTTP server on 127.0.0.1 standing in for the webhook receiver.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from domainflow.catalog import get_domain
from domainflow.monitoring.aggregation import window_counts
from domainflow.monitoring.batch import BatchValidationError, read_batch
from domainflow.monitoring.config import WEBHOOK_ALLOW_HOSTS_ENV, SurgeRule, WebhookSettings, build_config
from domainflow.monitoring.replay import build_replay
from domainflow.monitoring.store import ScoreStore
from domainflow.monitoring.surge import detect_surges
from domainflow.monitoring.topics import TopicExtractor, cashtags
from domainflow.monitoring.webhook import deliver
from flows.monitor import MonitorError, alert_key, monitor_batch, replay
from flows.monitor_cli import monitor_app

LABELS = ["bearish", "bullish", "neutral"]
RULE = SurgeRule(
    window="1h", baseline_windows=6, min_history=3, k=2.0, min_excess=1.0, min_share_excess=0.2, min_count=3
)
START = pd.Timestamp("2024-03-04T00:00:00Z")


# ----------------------------------------------------------------------------------- topics


def test_cashtags_are_tickers_not_prices() -> None:
    assert cashtags("$CCL $RCL - Nomura points to bookings weakness at Carnival") == ["$CCL", "$RCL"]
    assert cashtags("$aapl beats; $AAPL again, $brk.b too") == ["$AAPL", "$BRK.B"]
    assert cashtags("Deal worth $5 billion, or US$1.2B, at $3.50 a share") == []


def test_keyword_topics_match_whole_words_and_given_topics_win(tmp_path: Path) -> None:
    extract = TopicExtractor(get_domain("finance_sentiment").monitoring.keywords)
    assert extract("Fed signals more rate hikes as oil slides") == ["fed", "oil"]
    assert extract("Federal   Reserve holds; $TSLA slips") == ["$TSLA", "fed"]
    assert extract("Turmoil at FedEx as shipping slows") == []  # not 'oil', not 'fed'
    batch = tmp_path / "batch.csv"
    batch.write_text(
        "timestamp,text,topic\n2024-03-04T10:00:00Z,$AAPL falls on China worries,\n2024-03-04T10:05:00Z,$AAPL falls "
        "on China worries,Apple | supply chain\n"
    )
    items, duplicates = read_batch(batch, extract)
    assert [item.topics for item in items] == [["$AAPL", "china"], ["Apple", "supply chain"]]
    assert duplicates == 0


def test_configured_keywords_extend_or_replace_the_domain_map(tmp_path: Path) -> None:
    defaults = get_domain("finance_sentiment").monitoring
    extended = build_config(
        defaults, {"keywords": {"ai": ["artificial intelligence", "ai"]}, "surge": {"min_count": 9}}
    )
    assert set(extended.keywords) == set(defaults.keywords) | {"ai"} and extended.surge.min_count == 9
    assert extended.surge.k == defaults.surge.k  # untouched fields keep the domain's value
    replaced = build_config(defaults, {"keywords": {"ai": ["ai"]}, "replace_keywords": True})
    assert list(replaced.keywords) == ["ai"]
    with pytest.raises(ValueError, match="fixed pandas frequency"):
        build_config(defaults, {"surge": {"window": "1M"}})


# ----------------------------------------------------------------------------------- batches


def test_bad_batch_rows_are_named_by_line(tmp_path: Path) -> None:
    batch = tmp_path / "news.csv"
    batch.write_text("timestamp,text\n2024-03-04T10:00:00Z,fine\nyesterday-ish,bad time\n2024-03-04T10:01:00Z,\n")
    with pytest.raises(BatchValidationError) as error:
        read_batch(batch, TopicExtractor())
    message = str(error.value)
    assert (
        "news.csv" in message and "line 3 ('yesterday-ish')" in message and "line 4" in message and "'text'" in message
    )
    missing = tmp_path / "no_time.jsonl"
    missing.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(BatchValidationError, match=r"missing column\(s\) \['timestamp'\]"):
        read_batch(missing, TopicExtractor())


def test_timestamps_are_utc_and_duplicates_in_a_file_collapse(tmp_path: Path) -> None:
    batch = tmp_path / "b.jsonl"
    rows = [
        {"timestamp": "2024-03-04T12:00:00+02:00", "text": "A"},
        {"timestamp": 1709546400, "text": "B"},
        {"timestamp": "2024-03-04T10:00:00", "text": "A"},
    ]
    batch.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, duplicates = read_batch(batch, TopicExtractor())
    # 12:00+02:00, epoch 1709546400 and naive 10:00 are all 10:00 UTC; the two "A" rows are one item.
    assert [str(i.timestamp) for i in items] == ["2024-03-04 10:00:00+00:00"] * 2
    assert duplicates == 1 and len({i.item_id for i in items}) == 2


# ----------------------------------------------------------------------------------- store


def _row(item_id: str, minute: int = 0) -> dict:
    return {
        "item_id": item_id,
        "ts": (START + pd.Timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00"),
        "text": f"text {item_id}",
        "topics": ["$X"],
        "label": "bearish",
        "score": 0.9,
        "probs": {"bearish": 0.9},
        "model_version": 1,
        "batch": "b",
        "source": "f line 2",
    }


def test_store_append_is_idempotent(tmp_path: Path) -> None:
    store = ScoreStore(tmp_path / "s.sqlite")
    assert store.insert_items([_row("a"), _row("b")]) == 2
    assert store.insert_items([_row("a"), _row("b")]) == 0  # the same items again add nothing
    assert store.insert_items([_row("b"), _row("c", 5)]) == 1  # an overlapping batch adds only what is new
    assert store.count() == 3 and store.existing_ids(["a", "c", "z"]) == {"a", "c"}
    assert store.record_alert("$X", START, {"n": 1}) is True
    assert store.record_alert("$X", START, {"n": 2}) is False
    assert [a["n"] for a in store.alerts()] == [1]


# ----------------------------------------------------------------------------------- surge rules


def _counts(series: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    """Per topic, (bearish, other) counts per consecutive hourly window from START, as items."""
    rows = []
    for topic, windows in series.items():
        for index, (bearish, other) in enumerate(windows):
            stamp = START + pd.Timedelta(hours=index, minutes=10)
            rows += [{"ts": stamp, "topics": [topic], "label": "bearish"}] * bearish
            rows += [{"ts": stamp, "topics": [topic], "label": "neutral"}] * other
    items = pd.DataFrame(rows)
    grid = pd.date_range(
        START, START + pd.Timedelta(hours=max(len(w) for w in series.values()) - 1), freq="1h", tz="UTC"
    )
    return window_counts(items, "1h", LABELS, grid)


def _last(n: int) -> list[pd.Timestamp]:
    return [START + pd.Timedelta(hours=n - 1)]


def test_aggregation_fills_silent_windows_with_zero() -> None:
    counts = _counts({"$A": [(1, 1), (0, 0), (2, 0)], "$B": [(0, 1), (0, 0), (0, 0)]})
    a = counts[counts.topic == "$A"]
    assert a["bearish"].tolist() == [1, 0, 2] and a["total"].tolist() == [2, 0, 2]
    assert a["share_bearish"].tolist()[0] == 0.5 and pd.isna(a["share_bearish"].tolist()[1])
    assert len(counts) == 6  # 2 topics × 3 windows


def test_count_surge_fires_against_the_topics_own_baseline() -> None:
    # $A: 1,0,1,0,1,0 bearish then 6 -> mean 0.5, std 0.5, threshold 0.5 + 2*0.5 + 1 = 2.5 < 6
    # $B: always busy (5 bearish of 10), then 6 of 12: no count surge (threshold 5+0+1 = 6, not exceeded),
    # no share surge.
    counts = _counts({"$A": [(1, 3), (0, 3), (1, 3), (0, 3), (1, 3), (0, 3), (6, 3)], "$B": [(5, 5)] * 6 + [(6, 6)]})
    surges = detect_surges(counts, _last(7), RULE, "bearish")
    # (its share 6/9 also beats 0.125 + 2·0.125 + 0.2 = 0.575: both rules fire)
    assert [(s.topic, s.window_start.hour, s.rules) for s in surges] == [("$A", 6, ["count", "share"])]
    surge = surges[0]
    assert surge.negative_count == 6 and surge.total == 9 and surge.baseline_windows == 6
    assert (
        surge.baseline_mean == pytest.approx(0.5)
        and surge.baseline_std == pytest.approx(0.5)
        and surge.count_threshold == pytest.approx(2.5)
    )
    assert surge.share_threshold == pytest.approx(0.575)


def test_share_surge_fires_for_a_busy_topic() -> None:
    # Always 20 items, 2 of them bearish; then 3 of 4.
    counts = _counts({"$B": [(2, 18)] * 6 + [(3, 1)]})
    surges = detect_surges(counts, _last(7), RULE, "bearish")
    assert len(surges) == 1 and surges[0].rules == [
        "share"
    ]  # count 3 is not above 2 + 0 + 1 = 3, share 75% > 10% + 20%
    assert surges[0].share == pytest.approx(0.75) and surges[0].share_threshold == pytest.approx(0.3)


def test_no_surge_within_the_baseline() -> None:
    counts = _counts({"$A": [(4, 4), (2, 6), (5, 3), (3, 5), (4, 4), (2, 6), (5, 3)]})
    assert detect_surges(counts, _last(7), RULE, "bearish") == []


def test_min_count_keeps_a_few_items_from_being_an_alert() -> None:
    # Silent for six windows, then 2 bearish: far above a zero baseline, but under min_count 3.
    quiet = {"$Q": [(0, 0)] * 6 + [(2, 0)]}
    assert detect_surges(_counts(quiet), _last(7), RULE, "bearish") == []
    # One more item reaches min_count, and then it is a surge.
    assert [s.topic for s in detect_surges(_counts({"$Q": [(0, 0)] * 6 + [(3, 0)]}), _last(7), RULE, "bearish")] == [
        "$Q"
    ]
    # A single item never alerts, whatever the other settings.
    lax = RULE.model_copy(update={"k": 0.0, "min_excess": 0.0, "min_count": 1})
    assert [
        s.negative_count for s in detect_surges(_counts({"$Q": [(0, 0)] * 6 + [(1, 0)]}), _last(7), lax, "bearish")
    ] == [1]
    assert detect_surges(_counts({"$Q": [(0, 0)] * 6 + [(1, 0)]}), _last(7), RULE, "bearish") == []


def test_no_judgement_without_history() -> None:
    counts = _counts({"$A": [(0, 1), (9, 0)]})  # only one earlier window; min_history is 3
    assert detect_surges(counts, _last(2), RULE, "bearish") == []


# ----------------------------------------------------------------------------------- flow


def _stream(
    tmp_path: Path, name: str, *, surge_size: int = 12, windows: int = 8, limit: int = 160
) -> tuple[Path, object]:
    """One batch file: real valid-set headlines over ``windows`` hours, a surge on $ACME in the last one."""
    plan = build_replay(
        Path(__file__).resolve().parent.parent / "data" / "twitter_financial_news_sentiment" / "valid.csv",
        tmp_path / name,
        ticker="ACME",
        windows=windows,
        surge_window=windows - 1,
        surge_size=surge_size,
        windows_per_batch=windows,
        limit=limit,
        seed=1,
    )
    assert len(plan.files) == 1
    return plan.files[0], plan


FLOW_CONFIG = {"surge": {"window": "1h", "baseline_windows": 12, "min_history": 6, "k": 3.0, "min_count": 5}}


def test_missing_champion_or_monitoring_is_a_clear_error(tmp_path: Path) -> None:
    batch = tmp_path / "b.csv"
    batch.write_text("timestamp,text\n2024-03-04T10:00:00Z,$X up\n")
    with pytest.raises(MonitorError, match="no champion for 'finance_sentiment'.*domainflow run finance_sentiment"):
        monitor_batch(str(batch), domain="finance_sentiment", store_path=str(tmp_path / "s.sqlite"))
    with pytest.raises(MonitorError, match="domain 'customer_service' defines no monitoring"):
        monitor_batch(str(batch), domain="customer_service", store_path=str(tmp_path / "s.sqlite"))
    assert not (tmp_path / "batches").exists()  # nothing was read or written


def test_monitor_can_be_scheduled_like_retraining(tmp_path: Path) -> None:
    from flows.monitor import build_monitor_deployment

    deployment = build_monitor_deployment("finance_sentiment", str(tmp_path), cron="*/15 * * * *")
    assert deployment.name == "monitor-finance_sentiment"
    assert deployment.parameters == {"inbox": str(tmp_path.resolve()), "domain": "finance_sentiment"}
    assert [s.schedule.cron for s in deployment.schedules] == ["*/15 * * * *"]
    with pytest.raises(ValueError, match="exactly one of cron or interval"):
        build_monitor_deployment("finance_sentiment", str(tmp_path))
    with pytest.raises(MonitorError, match="defines no monitoring"):
        build_monitor_deployment("customer_service", str(tmp_path), interval_seconds=600)


def test_cli_scores_a_file_once_lists_alerts_and_names_bad_rows(tiny_finance: dict, tmp_path: Path) -> None:
    domain, runner = tiny_finance["domain"], CliRunner()
    batch, plan = _stream(tmp_path, "stream", limit=120)
    store = str(tmp_path / "cli.sqlite")
    config = tmp_path / "monitor.toml"
    config.write_text('[surge]\nbaseline_windows = 12\nmin_history = 6\n\n[keywords]\nacme = ["acme corp"]\n')
    first = runner.invoke(monitor_app, ["score", domain, str(batch), "--store", store, "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert f"{plan.items} item(s), {plan.items} new, 0 already stored" in first.output and "$ACME" in first.output
    second = runner.invoke(monitor_app, ["score", domain, str(batch), "--store", store, "--config", str(config)])
    assert second.exit_code == 0 and "already processed" in second.output
    listed = runner.invoke(monitor_app, ["alerts", domain, "--store", store, "--json"])
    assert [a["topic"] for a in json.loads(listed.output)] == ["$ACME"]
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,text\n2024-03-04T10:00:00Z,ok\nnot a time,$ACME falls\n")
    failed = runner.invoke(monitor_app, ["score", domain, str(bad), "--store", store])
    assert failed.exit_code == 2 and "bad.csv" in failed.output and "line 3" in failed.output


def test_same_batch_twice_adds_nothing_and_alerts_once(tiny_finance: dict, tmp_path: Path) -> None:
    domain = tiny_finance["domain"]
    batch, plan = _stream(tmp_path, "stream")
    store_path = str(tmp_path / "s.sqlite")
    first = monitor_batch(str(batch), domain=domain, config=FLOW_CONFIG, store_path=store_path)
    assert first["inserted"] == first["rows"] == plan.items
    assert [(a["topic"], a["window_start"]) for a in first["alerts"]] == [("$ACME", plan.surge_window.isoformat())]
    again = monitor_batch(str(batch), domain=domain, config=FLOW_CONFIG, store_path=store_path)
    assert again["already_processed"] is True and again["alerts"] == []
    # A different file carrying the same items (reordered) plus one new: only the new one is added, no new alert.
    lines = batch.read_text().splitlines()[::-1] + [
        json.dumps({"timestamp": "2024-03-04T07:59:00Z", "text": "$ACME files 10-K"})
    ]
    overlap = tmp_path / "overlap.jsonl"
    overlap.write_text("\n".join(lines) + "\n")
    third = monitor_batch(str(overlap), domain=domain, config=FLOW_CONFIG, store_path=store_path)
    assert (third["inserted"], third["already_stored"], third["alerts"]) == (1, plan.items, [])
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT item_id) FROM items").fetchone() == (
            plan.items + 1,
            plan.items + 1,
        )
        assert db.execute("SELECT COUNT(*) FROM alerts").fetchone() == (1,)


def test_crash_mid_batch_loses_nothing_and_duplicates_nothing(
    tiny_finance: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    domain = tiny_finance["domain"]
    batch, plan = _stream(tmp_path, "stream", limit=100)
    store_path = str(tmp_path / "s.sqlite")
    config = {**FLOW_CONFIG, "score_chunk_size": 40}
    real_insert = ScoreStore.insert_items
    calls = {"n": 0}

    def crash_after_first_chunk(self, rows):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("simulated crash while writing a chunk")
        return real_insert(self, rows)

    with monkeypatch.context() as patch:
        patch.setattr(ScoreStore, "insert_items", crash_after_first_chunk)
        with pytest.raises(OSError, match="simulated crash"):
            monitor_batch(str(batch), domain=domain, config=config, store_path=store_path)
    store = ScoreStore(store_path)
    assert store.count() == 40  # the first chunk was committed whole; nothing of the second
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT completed_at FROM batches").fetchall() == [(None,)]  # started, not completed

    resumed = monitor_batch(str(batch), domain=domain, config=config, store_path=store_path)
    assert resumed["already_processed"] is False
    assert (resumed["inserted"], resumed["already_stored"]) == (plan.items - 40, 40)
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT item_id) FROM items").fetchone() == (plan.items, plan.items)
        assert db.execute("SELECT completed_at IS NOT NULL FROM batches").fetchone() == (1,)


class _Receiver(BaseHTTPRequestHandler):
    """A webhook receiver: answers with the class's status (and ``location``, for a redirect) and keeps every
    JSON body and the Host header it came with."""

    status = 200
    location: str | None = None
    bodies: list = []
    hosts: list = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length", 0))
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        type(self).hosts.append(self.headers.get("Host"))
        self.send_response(type(self).status)
        if type(self).location:
            self.send_header("Location", type(self).location)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"status": 200, "location": None, "bodies": [], "hosts": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/secret-token", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [200, 500])
def test_webhook_posts_the_alert_and_its_failure_never_fails_the_flow(
    tiny_finance: dict, tmp_path: Path, receiver, status: int
) -> None:
    url, handler = receiver
    handler.status = status
    batch, plan = _stream(tmp_path, "stream")
    # The receiver is on loopback, which the SSRF guard refuses unless the host is allowed explicitly.
    config = {
        **FLOW_CONFIG,
        "webhook": {"url": url, "retries": 2, "retry_delay_seconds": 0, "allow_hosts": ["127.0.0.1"]},
    }
    result = monitor_batch(
        str(batch), domain=tiny_finance["domain"], config=config, store_path=str(tmp_path / "s.sqlite")
    )
    assert [a["topic"] for a in result["alerts"]] == ["$ACME"]
    alert = result["alerts"][0]
    if status == 200:
        assert len(handler.bodies) == 1 and alert["webhook"] == "sent (HTTP 200)"
    else:
        assert len(handler.bodies) == 3  # the first try and two retries
        assert alert["webhook"].startswith("failed after 3 tries")
    body = handler.bodies[0]
    assert body["topic"] == "$ACME" and body["window_start"] == plan.surge_window.isoformat()
    assert (
        body["negative_label"] == "bearish" and body["negative_count"] >= 5 and body["domain"] == tiny_finance["domain"]
    )
    stored = ScoreStore(tmp_path / "s.sqlite").alerts()
    assert [(a["topic"], a["notified"]) for a in stored] == [("$ACME", alert["webhook"])]


def test_unreachable_webhook_is_logged_not_fatal(tiny_finance: dict, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    batch, _ = _stream(tmp_path, "stream")
    config = {
        **FLOW_CONFIG,
        "webhook": {
            "url": f"http://127.0.0.1:{port}/hook",
            "retries": 1,
            "retry_delay_seconds": 0,
            "timeout_seconds": 2,
            "allow_hosts": ["127.0.0.1"],
        },
    }
    result = monitor_batch(
        str(batch), domain=tiny_finance["domain"], config=config, store_path=str(tmp_path / "s.sqlite")
    )
    assert result["alerts"][0]["webhook"].startswith("failed after 2 tries")


def test_webhook_to_loopback_is_refused_and_the_alert_says_so(tiny_finance: dict, tmp_path: Path, receiver) -> None:
    """Without an allow-list entry, a loopback receiver gets nothing; the alert is recorded as not sent, with why."""
    url, handler = receiver
    batch, _ = _stream(tmp_path, "stream")
    config = {**FLOW_CONFIG, "webhook": {"url": url, "retries": 3, "retry_delay_seconds": 0}}
    result = monitor_batch(
        str(batch), domain=tiny_finance["domain"], config=config, store_path=str(tmp_path / "s.sqlite")
    )
    (alert,) = result["alerts"]
    assert handler.bodies == []
    assert alert["webhook"].startswith("not sent: refused: 127.0.0.1 is a loopback address")
    assert "allow_hosts" in alert["webhook"] and "secret-token" not in alert["webhook"]
    stored = ScoreStore(tmp_path / "s.sqlite").alerts()
    assert [(a["topic"], a["notified"]) for a in stored] == [("$ACME", alert["webhook"])]


def _hook(**settings: Any) -> WebhookSettings:
    return WebhookSettings(**{"retries": 3, "retry_delay_seconds": 0, **settings})


def test_webhook_allow_list_comes_from_settings_or_the_environment(receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = receiver
    monkeypatch.delenv(WEBHOOK_ALLOW_HOSTS_ENV, raising=False)
    refused = deliver(url, {"n": 1}, _hook())
    assert (refused.delivered, refused.attempts, handler.bodies) == (False, 0, [])
    monkeypatch.setenv(WEBHOOK_ALLOW_HOSTS_ENV, " example.org , 127.0.0.1")
    sent = deliver(url, {"n": 2}, _hook())
    assert (sent.delivered, sent.attempts, sent.summary(), handler.bodies) == (True, 1, "sent (HTTP 200)", [{"n": 2}])
    monkeypatch.delenv(WEBHOOK_ALLOW_HOSTS_ENV)
    assert deliver(url.replace("127.0.0.1", "localhost"), {"n": 3}, _hook(allow_hosts=["LOCALHOST."])).delivered
    for bad in ("http://127.0.0.1/", "127.0.0.1:8080", "", "user@host"):
        with pytest.raises(ValueError, match="allow_hosts"):
            WebhookSettings(allow_hosts=[bad])
    assert WebhookSettings(allow_hosts=["[::1]", "fd00::1", " hooks.internal "]).allow_hosts[2] == "hooks.internal"


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[::ffff:169.254.169.254]/hook", "link-local"),
        ("http://10.1.2.3/hook", "private"),
        ("https://192.168.0.10:8443/hook", "private"),
        ("http://[fd12:3456::1]/hook", "private"),
        ("http://[2002:a01:203::1]/hook", "private"),  # 6to4 wrapping 10.1.2.3
        ("http://0.0.0.0:8080/hook", "unspecified"),
        ("http://224.0.0.251/hook", "multicast"),
        ("http://100.64.0.1/hook", "not a globally routable"),
        ("http://[::1]/hook", "loopback"),
        ("ftp://example.com/hook", "must be http(s)"),
        ("file:///etc/passwd", "must be http(s)"),
    ],
)
def test_webhook_to_a_non_public_address_is_refused_without_network_io(
    url: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address in the URL is judged as it is: no lookup, no connection, no request."""
    import socket

    touched: list[str] = []

    def no_network(name: str):
        def refuse(*args: Any, **kwargs: Any) -> Any:
            touched.append(name)
            raise AssertionError(f"{name} called")

        return refuse

    monkeypatch.setattr(socket, "getaddrinfo", no_network("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", no_network("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", no_network("connect"))
    monkeypatch.delenv(WEBHOOK_ALLOW_HOSTS_ENV, raising=False)
    delivery = deliver(url, {"topic": "$ACME"}, _hook())
    assert (delivery.delivered, delivery.attempts, delivery.status) == (False, 0, None)
    assert reason in delivery.reason and delivery.summary().startswith("not sent: ")
    assert touched == []


def test_webhook_host_names_are_judged_by_every_address_they_resolve_to(
    receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name is resolved first; one private address among public ones is enough to refuse (the client could
    connect to it). A name that passes is connected to at the address that was checked, with its own Host."""
    import socket

    url, handler = receiver
    port = int(url.split(":")[2].split("/")[0])

    def dns(table: dict[str, list[str]]):
        def resolve(host: str, port_: int, **kwargs: Any) -> list[tuple]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port_)) for ip in table[host]]

        return resolve

    metadata = dns({"metadata.example": ["169.254.169.254"]})
    refused = deliver("http://metadata.example/computeMetadata/v1/", {}, _hook(), resolve=metadata)
    assert not refused.delivered and "metadata.example resolves to 169.254.169.254, which is a link-local" in (
        refused.reason
    )
    mixed = dns({"hooks.example": ["93.184.215.14", "10.0.0.7"]})
    assert (
        "10.0.0.7, which is a private address" in deliver("https://hooks.example/x", {}, _hook(), resolve=mixed).reason
    )
    assert handler.bodies == []

    # Pinning, seen from the receiver: the vetted address is dialled, the Host header names the host.
    from domainflow.monitoring import webhook

    public_looking = dns({"hooks.example": ["127.0.0.1"]})
    monkeypatch.setattr(webhook, "forbidden_reason", lambda address: None)  # 127.0.0.1 passes as public
    sent = deliver(f"http://hooks.example:{port}/hooks/secret-token", {"n": 1}, _hook(), resolve=public_looking)
    assert sent.delivered and handler.bodies == [{"n": 1}] and handler.hosts == [f"hooks.example:{port}"]


def test_webhook_4xx_is_answered_once_and_a_redirect_is_not_followed(receiver) -> None:
    url, handler = receiver
    handler.status = 404
    rejected = deliver(url, {"n": 1}, _hook(retries=5, allow_hosts=["127.0.0.1"]))
    assert len(handler.bodies) == 1
    assert (rejected.delivered, rejected.attempts, rejected.status) == (False, 1, 404)
    assert rejected.summary().startswith("failed after 1 try: ") and "HTTP 404" in rejected.reason
    assert "secret-token" not in rejected.summary()

    handler.status, handler.location = 302, "http://169.254.169.254/latest/meta-data/"
    redirected = deliver(url, {"n": 2}, _hook(retries=5, allow_hosts=["127.0.0.1"]))
    assert len(handler.bodies) == 2  # one request, and nothing sent to where the redirect points
    assert (redirected.delivered, redirected.attempts, redirected.status) == (False, 1, 302)
    assert "not followed" in redirected.reason


def test_webhook_5xx_is_retried_until_the_deadline(receiver) -> None:
    """Tries 1 s apart under a 3.5 s deadline: four tries, then no wait that would end past it. The clock is the
    test's (each wait moves it), the requests are real: the count does not depend on the machine's speed."""
    url, handler = receiver
    handler.status = 503
    now = [1000.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    settings = _hook(retries=50, retry_delay_seconds=1.0, deadline_seconds=3.5, allow_hosts=["127.0.0.1"])
    failed = deliver(url, {"n": 1}, settings, clock=lambda: now[0], sleep=sleep)
    assert len(handler.bodies) == 4
    assert (failed.delivered, failed.attempts, failed.status) == (False, 4, 503)
    assert failed.summary().startswith("failed after 4 tries: ") and "deadline of 3.5s reached" in failed.reason

    handler.bodies.clear()
    handler.status = 500
    exhausted = deliver(url, {"n": 2}, _hook(retries=2, allow_hosts=["127.0.0.1"]), clock=lambda: now[0], sleep=sleep)
    assert len(handler.bodies) == 3 and exhausted.attempts == 3 and "deadline" not in exhausted.reason


def test_replay_raises_exactly_the_injected_alert(
    tiny_finance: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay command end to end: output, return code, the Prefect event and the alert artifacts."""
    import prefect.events

    domain = tiny_finance["domain"]
    events: list[dict] = []
    real_emit = prefect.events.emit_event

    def recording_emit(**kwargs):
        events.append(kwargs)
        return real_emit(**kwargs)

    monkeypatch.setattr(prefect.events, "emit_event", recording_emit)
    result = CliRunner().invoke(
        monitor_app,
        [
            "replay",
            domain,
            "--windows",
            "10",
            "--surge-window",
            "8",
            "--windows-per-batch",
            "5",
            "--limit",
            "300",
            "--out-dir",
            str(tmp_path / "replay"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "OK: exactly the injected surge was detected" in result.output
    alerts = ScoreStore(tmp_path / "replay" / "replay.sqlite").alerts()
    assert len(alerts) == 1
    topic = alerts[0]["topic"]
    assert topic.startswith("$") and alerts[0]["window_start"] == "2024-03-04T08:00:00+00:00"
    assert topic in result.output
    assert [(e["event"], e["resource"]["prefect.resource.name"], e["payload"]["window_start"]) for e in events] == [
        ("domainflow.sentiment.surge", topic, alerts[0]["window_start"])
    ]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = alert_key(domain, topic)
    assert key == f"fin-tiny-surge-{topic[1:].lower()}"
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key, f"{key}-trend", f"{key}-windows"]))
        )
    kinds = {a.key: a for a in found}
    assert {key, f"{key}-trend", f"{key}-windows"} <= set(kinds)
    assert topic in kinds[key].data and "bearish" in kinds[key].data
    assert "data:image/png;base64," in str(kinds[f"{key}-trend"].data)


def test_replay_flow_reports_a_mismatch(tiny_finance: dict, tmp_path: Path) -> None:
    """With a min_count above the injected surge, nothing fires, and the replay says so."""
    result = replay(
        domain=tiny_finance["domain"],
        windows=8,
        surge_window=7,
        surge_size=6,
        windows_per_batch=8,
        limit=120,
        out_dir=str(tmp_path / "r"),
        config={"surge": {"min_count": 7}},
    )
    assert result["matched"] is False and result["alerts"] == []
