"""``domainflow serve`` under load from a real load generator, against the model's own batch-32 throughput.

Usage (from the repository root; the domain needs a champion under ``DOMAINFLOW_HOME``)::

    python benchmarks/serve_load.py                          # customer_service; wrk when installed
    python benchmarks/serve_load.py --client python          # the asyncio client below instead of wrk
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a service already running

One run, one machine, in this order (a noisy machine slows everything alike, so read the ratios):

1. **model**: the champion as the service loads it (``load_classifier`` + ``predict_proba``) classifies the
   test texts at batch 32 in this process: the ceiling a service of one-text requests can approach.
2. **load**: one-text requests (real test texts, rotated) at ``--concurrency`` for ``--seconds``:
   throughput, p50/p90/p99 latency, errors.
3. **model** again; the ceiling is the mean of both measurements.
4. **overload**: ``--overload-factor`` times the connections, so the clients offer far more than the
   service can answer: answered vs 503, the answered requests' p99 against the deadline, the server's own
   time for each 503 (``domainflow_shed_latency_seconds`` from ``/metrics``) and the service's resident
   memory before and after.

The goal printed at the end: load throughput >= 80% of the model's batch-32 throughput with p99 <= 100 ms
and no error; under overload, 503s only as fast refusals (<= 10 ms each, server side), answered requests
within their deadline, memory flat (< 10% growth). Which client ran is printed: wrk is a C load generator
(``apt install wrk``); the Python client saturates a 2-core machine well before the service does.

Only loopback addresses are accepted: this loads a service of yours, not someone else's.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script belongs to, not another installed copy

from benchmarks.common import labelled_test_texts  # noqa: E402
from domainflow.settings import configure_environment  # noqa: E402

configure_environment()

import httpx  # noqa: E402

GOAL_SHARE_OF_MODEL = 0.80
GOAL_P99_MS = 100.0
GOAL_SHED_MS = 10.0
GOAL_MEMORY_GROWTH = 0.10
MODEL_BATCH = 32


@dataclass
class Phase:
    """What one load phase measured (either client)."""

    name: str
    client: str
    connections: int
    seconds: float = 0.0
    responses: int = 0
    ok: int = 0  # 2xx
    transport_errors: int = 0
    p50_ms: float = float("nan")  # the client's view, all responses
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    # the server's view (from /metrics, predict endpoint, this phase only)
    shed: int = 0  # 503s
    shed_within_10ms: int = 0
    answered_p99_at_most_ms: float = float("nan")

    server_errors: int = 0  # answered neither 200 nor 503 (4xx, 500); 499 (the client left) is not counted

    @property
    def other_errors(self) -> int:
        """Neither answered nor shed: 4xx and 5xx other than 503 (the server's count), broken connections and
        timeouts (the client's). Why not the client's non-2xx minus the server's 503s: requests in flight when
        a phase ends are counted by one side and not the other."""
        return self.server_errors + self.transport_errors

    def rate(self, count: int) -> float:
        return count / self.seconds if self.seconds else 0.0


#: (name, url, key, bodies, connections, seconds) -> what the client saw
PhaseFunction = Callable[[str, str, str, list[str], int, float], Phase]

# ---------------------------------------------------------------------------------------------- wrk

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = {key}
local bodies = {bodies}
function init(args) index = math.random(#bodies) end
function request()
  index = index % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[index])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {{"duration_us": %d, "requests": %d, "non_2xx": %d, "transport_errors": %d, "p50_us": %d, ' ..
    '"p90_us": %d, "p99_us": %d, "max_us": %d}}\\n',
    summary.duration, summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(text: str) -> str:
    """A Lua long-bracket literal: taken as is, no escapes (a level that does not occur in the text)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def wrk_phase(name: str, url: str, key: str, bodies: list[str], connections: int, seconds: float) -> Phase:
    script = _WRK_SCRIPT.format(key=_lua_string(key), bodies="{" + ", ".join(_lua_string(b) for b in bodies) + "}")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False, encoding="utf-8") as handle:
        handle.write(script)
    try:
        threads = min(2, connections)
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", handle.name]
        out = subprocess.run(command + [url], capture_output=True, text=True, timeout=seconds + 60, check=False)
    finally:
        os.unlink(handle.name)
    match = re.search(r"^WRK_RESULT (.*)$", out.stdout, re.M)
    if match is None:
        raise SystemExit(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    data = json.loads(match.group(1))
    return Phase(
        name,
        "wrk",
        connections,
        seconds=data["duration_us"] / 1e6,
        responses=data["requests"],
        ok=data["requests"] - data["non_2xx"],
        transport_errors=data["transport_errors"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )


# ---------------------------------------------------------------------------------- python client


def python_phase(name: str, url: str, key: str, bodies: list[str], connections: int, seconds: float) -> Phase:
    """The same phase from an asyncio httpx client (when wrk is not installed); it saturates first."""

    async def run() -> Phase:
        phase = Phase(name, "python (httpx)", connections)
        latencies: list[float] = []
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        headers = {"X-API-Key": key, "Content-Type": "application/json"}
        started = time.perf_counter()
        deadline = started + seconds
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0)) as client:

            async def worker(offset: int) -> None:
                index = offset
                while time.perf_counter() < deadline:
                    index = (index + 1) % len(bodies)
                    t0 = time.perf_counter()
                    try:
                        response = await client.post(url, content=bodies[index], headers=headers)
                    except httpx.HTTPError:
                        phase.transport_errors += 1
                        continue
                    phase.responses += 1
                    phase.ok += response.is_success
                    latencies.append((time.perf_counter() - t0) * 1000)

            await asyncio.gather(*(worker(i * 7) for i in range(connections)))
        phase.seconds = time.perf_counter() - started
        if latencies:
            ordered = sorted(latencies)
            pick = lambda q: ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]  # noqa: E731
            phase.p50_ms, phase.p90_ms, phase.p99_ms, phase.max_ms = pick(50), pick(90), pick(99), ordered[-1]
        return phase

    return asyncio.run(run())


# ------------------------------------------------------------------------------------- the service


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing to load {url}: {host} is not a loopback address ({', '.join(sorted(addresses))})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(domain: str, key: str, deadline_ms: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "DOMAINFLOW_API_KEYS": key}
    command = [sys.executable, "-m", "flows.cli", "serve", domain, "--port", str(port)]
    command += ["--request-deadline-ms", str(deadline_ms)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base, [domain])
    return process, base


def wait_until_ready(process: subprocess.Popen, base: str, domains: Sequence[str], timeout: float = 300) -> None:
    """Return once ``/readyz/{domain}`` answers 200 for every domain; SystemExit when the service exits or the
    timeout passes (the service is then killed)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"the service exited ({process.returncode}): {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if all(httpx.get(f"{base}/readyz/{domain}", timeout=2).status_code == 200 for domain in domains):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the service was not ready within {timeout:.0f} s")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


Histogram = dict[float, float]  # bucket bound (seconds) -> cumulative count


def server_histograms(base: str, key: str, domain: str) -> dict[str, Histogram]:
    """The server's own view of the predict endpoint: request times of ``all`` responses and of the ``shed``
    ones (503) by bucket bound, and responses by ``status`` (keyed by the status code as a float)."""
    text = httpx.get(f"{base}/metrics", headers={"X-API-Key": key}, timeout=10).text
    found: dict[str, Histogram] = {"all": {}, "shed": {}, "status": {}}
    names = {
        "domainflow_request_latency_seconds_bucket": "all",
        "domainflow_shed_latency_seconds_bucket": "shed",
        "domainflow_requests_total": "status",
    }
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name not in names:
            continue
        labels_text, _, value = rest.rpartition("} ")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        if labels.get("domain") == domain and labels.get("endpoint") == "/v1/{domain}/predict":
            if names[name] == "status":
                key_ = float(labels["status"])
            else:
                key_ = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            found[names[name]][key_] = float(value)
    return found


def difference(after: Histogram, before: Histogram) -> Histogram:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def quantile_bound(histogram: Histogram, q: float) -> float:
    """The smallest bucket bound (seconds) under which at least ``q`` of the counted requests fall."""
    total = histogram.get(float("inf"), 0.0)
    for bound in sorted(histogram):
        if total and histogram[bound] >= q * total:
            return bound
    return float("nan")


# ------------------------------------------------------------------------------------------ model


def model_texts_per_second(domain: str, texts: list[str], rounds: int) -> tuple[float, float]:
    """Median texts/s of the champion at batch 32 over ``rounds`` passes, in this process: length-sorted batches
    (as ``benchmarks/inference.py`` measures the model), and batches of 32 in arrival order as a service gets them
    (each cut into the service's length-sorted passes)."""
    from domainflow.modeling import load_classifier, predict_proba
    from domainflow.registry import ModelRegistry
    from serving.inference import MODEL_PASS_TEXTS

    champion = ModelRegistry(domain).champion()
    if champion is None:
        raise SystemExit(f"no champion for {domain}: run `domainflow run {domain}` first")
    model = load_classifier(champion.model_dir)
    predict_proba(model, texts[:MODEL_BATCH], batch_size=MODEL_BATCH)  # warm-up
    speeds: dict[str, list[float]] = {"sorted": [], "arrival": []}
    for _ in range(rounds):
        started = time.perf_counter()
        predict_proba(model, texts, batch_size=MODEL_BATCH)
        speeds["sorted"].append(len(texts) / (time.perf_counter() - started))
        started = time.perf_counter()
        for start in range(0, len(texts), MODEL_BATCH):
            predict_proba(model, texts[start : start + MODEL_BATCH], batch_size=MODEL_PASS_TEXTS)
        speeds["arrival"].append(len(texts) / (time.perf_counter() - started))
    return statistics.median(speeds["sorted"]), statistics.median(speeds["arrival"])


# ------------------------------------------------------------------------------------------- report


def print_phase(phase: Phase) -> None:
    print(
        f"\n[{phase.name}] {phase.client}, {phase.connections} connections, {phase.seconds:.1f} s: "
        f"{phase.rate(phase.responses):.1f} responses/s, {phase.rate(phase.ok):.1f} answered/s"
    )
    print(
        f"  client latency ms (all responses): p50 {phase.p50_ms:.1f}  p90 {phase.p90_ms:.1f}  "
        f"p99 {phase.p99_ms:.1f}  max {phase.max_ms:.1f}"
    )
    print(
        f"  server: {phase.shed} x 503 ({phase.shed_within_10ms} within {GOAL_SHED_MS:g} ms), answered p99 <= "
        f"{phase.answered_p99_at_most_ms:g} ms; other errors {phase.other_errors} "
        f"(transport {phase.transport_errors})"
    )


def measured_phase(
    phase_of: PhaseFunction,
    name: str,
    base: str,
    key: str,
    domain: str,
    bodies: list[str],
    connections: int,
    seconds: float,
) -> Phase:
    """One load phase, with the server's own count and times of its 503s and answers during it."""
    before = server_histograms(base, key, domain)
    phase = phase_of(name, f"{base}/v1/{domain}/predict", key, bodies, connections, seconds)
    after = server_histograms(base, key, domain)
    shed = difference(after["shed"], before["shed"])
    answered = {b: n - shed.get(b, 0.0) for b, n in difference(after["all"], before["all"]).items()}
    statuses = difference(after["status"], before["status"])
    phase.server_errors = int(sum(n for code, n in statuses.items() if code not in (200, 499, 503)))
    phase.shed = int(shed.get(float("inf"), 0.0))
    phase.shed_within_10ms = int(shed.get(GOAL_SHED_MS / 1000, 0.0))
    phase.answered_p99_at_most_ms = quantile_bound(answered, 0.99) * 1000
    return phase


def run(args: argparse.Namespace) -> dict:
    texts, _ = labelled_test_texts(args.domain, args.max_texts, seed=0)
    bodies = [json.dumps({"texts": [text]}, ensure_ascii=False) for text in texts]
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "python")
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt install wrk); use --client python")
    phase_of: PhaseFunction = wrk_phase if client == "wrk" else python_phase

    process = None
    key = args.api_key or os.environ.get("DOMAINFLOW_API_KEY") or ""
    if args.url:
        base = args.url.rstrip("/")
        require_loopback(base)
        if not key:
            raise SystemExit("--url needs the service's key: --api-key or DOMAINFLOW_API_KEY")
    else:
        key = secrets.token_urlsafe(24)
        process, base = start_service(args.domain, key, args.deadline_ms)
    try:
        print(f"service {base} ({args.domain}), client {client}, deadline {args.deadline_ms:g} ms")
        sorted_before, arrival_before = model_texts_per_second(args.domain, texts, args.rounds)
        phase_of("warm-up", f"{base}/v1/{args.domain}/predict", key, bodies, args.concurrency, 3)
        load = measured_phase(phase_of, "load", base, key, args.domain, bodies, args.concurrency, args.seconds)
        print_phase(load)
        sorted_after, arrival_after = model_texts_per_second(args.domain, texts, args.rounds)
        ceiling, arrival = (sorted_before + sorted_after) / 2, (arrival_before + arrival_after) / 2
        print(
            f"\nmodel alone, batch {MODEL_BATCH}: {ceiling:.1f} texts/s length-sorted (benchmarks/inference.py's "
            f"measure), {arrival:.1f} in arrival order (mean of before and after the load)"
        )
        rss_before = rss_mb(process.pid) if process else None
        connections = args.concurrency * args.overload_factor
        overload = measured_phase(phase_of, "overload", base, key, args.domain, bodies, connections, args.seconds)
        rss_after = rss_mb(process.pid) if process else None
        print_phase(overload)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    share = load.rate(load.ok) / ceiling if ceiling else 0.0
    growth = (rss_after / rss_before - 1) if rss_before and rss_after else None
    offered = overload.rate(overload.responses) / load.rate(load.ok) if load.ok else float("nan")
    load_goal = share >= GOAL_SHARE_OF_MODEL and load.p99_ms <= GOAL_P99_MS and load.other_errors == 0 and not load.shed
    overload_goal = (
        overload.other_errors == 0
        and overload.shed_within_10ms == overload.shed
        and overload.answered_p99_at_most_ms <= 2 * args.deadline_ms  # queued at most the deadline, then one call
        and (growth is None or growth < GOAL_MEMORY_GROWTH)
    )
    print(
        f"\nload: {load.rate(load.ok):.1f} answered/s = {share:.0%} of the model's {ceiling:.1f} texts/s at batch "
        f"{MODEL_BATCH} ({load.rate(load.ok) / arrival:.0%} of {arrival:.1f} in arrival order; goal >= "
        f"{GOAL_SHARE_OF_MODEL:.0%}); p99 {load.p99_ms:.1f} ms (goal <= {GOAL_P99_MS:g}); errors "
        f"{load.other_errors + load.shed} (goal 0) -> {'met' if load_goal else 'NOT met'}"
    )
    memory = f"RSS {rss_before:.0f} -> {rss_after:.0f} MB" if rss_before and rss_after else "RSS not measured"
    print(
        f"overload: {connections} connections offered {offered:.1f}x the sustained rate; {overload.shed_within_10ms}/"
        f"{overload.shed} 503s within {GOAL_SHED_MS:g} ms in the server; answered p99 <= "
        f"{overload.answered_p99_at_most_ms:g} ms in the server (deadline {args.deadline_ms:g} ms); other errors "
        f"{overload.other_errors}; {memory} -> {'met' if overload_goal else 'NOT met'}"
    )
    return {
        "client": client,
        "deadline_ms": args.deadline_ms,
        "model_texts_per_second_batch32_sorted": round(ceiling, 1),
        "model_texts_per_second_batch32_arrival_order": round(arrival, 1),
        "load": {**asdict(load), "answered_per_second": round(load.rate(load.ok), 1)},
        "load_share_of_model": round(share, 3),
        "overload": {
            **asdict(overload),
            "responses_per_second": round(overload.rate(overload.responses), 1),
            "offered_over_sustained": round(offered, 2),
            "rss_mb_before": rss_before,
            "rss_mb_after": rss_after,
        },
        "goal_met": {"load": load_goal, "overload": overload_goal},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", default="customer_service")
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto", help="auto: wrk if installed.")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="Connections in the load phase.")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each load phase.")
    parser.add_argument("--overload-factor", type=int, default=10, help="Overload connections = this x concurrency.")
    parser.add_argument(
        "--deadline-ms",
        type=float,
        default=250.0,
        help="--request-deadline-ms of the service this script starts (an interactive client's budget).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="Passes over the texts per model measurement.")
    parser.add_argument("--max-texts", type=int, default=1000, help="Test texts used (a seeded sample).")
    parser.add_argument("--url", default=None, help="Load a running service instead of starting one (loopback).")
    parser.add_argument("--api-key", default=None, help="Its key (default: DOMAINFLOW_API_KEY).")
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    args = parser.parse_args(argv)
    for name in ("concurrency", "overload_factor", "rounds", "max_texts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be in [1, 600]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(report["goal_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
