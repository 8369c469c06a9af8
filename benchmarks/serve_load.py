"""Load test of a running ``domainflow serve`` on loopback: throughput, latency percentiles, errors,
and the micro-batching ratio against one-at-a-time inference.

Usage (the service must be running; the key is one of its keys)::

    DOMAINFLOW_API_KEY=... python benchmarks/serve_load.py --url http://127.0.0.1:8000 \
        --domain customer_service --requests 10000 --concurrency 32

Phases, each bounded in count *and* time (``--max-seconds``; a phase stops sending when its time
is up and reports what it did):

1. warm-up: a few requests, not counted;
2. load: ``--requests`` requests at ``--concurrency``, texts from the real Banking77 test split;
3. baseline: one-at-a-time inference, by default ``--baseline-requests`` requests sent one after
   the other to the same service (so every model call is a batch of one).
   ``--baseline-url`` points it at a second service started with ``--max-batch 1`` instead, and
   ``--baseline-concurrency`` loads that one like phase 2: the same load with batching off.

It prints throughput, p50/p95/p99 latency and errors by kind for each phase, the mean batch size
the server reports in ``/metrics`` (``domainflow_batch_size_texts``), and the ratio
load throughput / baseline throughput. Only loopback addresses are accepted: this is a
benchmark of the service, not a tool to load someone else's.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import json
import os
import random
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

DEFAULT_TEXTS = Path(__file__).resolve().parent.parent / "data" / "banking77" / "test.csv"


@dataclass
class PhaseResult:
    name: str
    requests_planned: int
    concurrency: int
    texts_per_request: int
    sent: int = 0
    ok: int = 0
    client_errors: int = 0  # 4xx
    server_errors: int = 0  # 5xx
    transport_errors: int = 0  # connection refused/reset, timeouts
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    status_counts: dict[str, int] = field(default_factory=dict)
    stopped_by_time: bool = False
    mean_batch_size: float | None = None

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies, in ms."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        rank = max(1, min(len(ordered), int(round(q / 100 * len(ordered) + 0.5))))
        return ordered[rank - 1]

    def summary(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        data.update(
            throughput_requests_per_s=round(self.throughput_rps, 1),
            throughput_texts_per_s=round(self.throughput_rps * self.texts_per_request, 1),
            p50_ms=round(self.percentile(50), 2),
            p95_ms=round(self.percentile(95), 2),
            p99_ms=round(self.percentile(99), 2),
            max_ms=round(max(self.latencies_ms), 2) if self.latencies_ms else None,
        )
        return data


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing to load {url}: {host} is not a loopback address ({', '.join(sorted(addresses))})")


def load_texts(path: Path, limit: int = 5000, seed: int = 0) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        texts = [row["text"].strip() for row in csv.DictReader(handle) if row.get("text", "").strip()]
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def batch_stats(metrics_text: str, domain: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram for ``domain``."""
    values = {}
    for kind in ("sum", "count"):
        match = re.search(
            rf'^domainflow_batch_size_texts_{kind}\{{domain="{re.escape(domain)}"\}} ([0-9.e+]+)$', metrics_text, re.M
        )
        values[kind] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


async def scrape_batches(client: httpx.AsyncClient, base: str, domain: str) -> tuple[float, float] | None:
    try:
        response = await client.get(f"{base}/metrics")
        return batch_stats(response.text, domain) if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def run_phase(
    name: str,
    base: str,
    domain: str,
    key: str,
    texts: list[str],
    requests: int,
    concurrency: int,
    per_request: int,
    max_seconds: float,
    offset: int = 0,
) -> PhaseResult:
    result = PhaseResult(name, requests, concurrency, per_request)
    url = f"{base}/v1/{domain}/predict"
    headers = {"X-API-Key": key}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    counter = iter(range(requests))
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)) as client:
        before = await scrape_batches(client, base, domain)
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() >= deadline:
                    result.stopped_by_time = True
                    return
                start = (offset + i * per_request) % len(texts)
                body = {"texts": [texts[(start + j) % len(texts)] for j in range(per_request)], "top_k": 3}
                t0 = time.perf_counter()
                result.sent += 1
                try:
                    response = await client.post(url, json=body, headers=headers)
                except httpx.HTTPError as exc:
                    result.transport_errors += 1
                    result.status_counts[type(exc).__name__] = result.status_counts.get(type(exc).__name__, 0) + 1
                    continue
                elapsed = (time.perf_counter() - t0) * 1000
                code = str(response.status_code)
                result.status_counts[code] = result.status_counts.get(code, 0) + 1
                if response.status_code == 200:
                    result.ok += 1
                    result.latencies_ms.append(elapsed)
                elif response.status_code >= 500:
                    result.server_errors += 1
                else:
                    result.client_errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
        after = await scrape_batches(client, base, domain)
    if before and after and after[1] > before[1]:
        result.mean_batch_size = round((after[0] - before[0]) / (after[1] - before[1]), 2)
    return result


def print_phase(r: PhaseResult) -> None:
    s = r.summary()
    timed = " (stopped by --max-seconds)" if r.stopped_by_time else ""
    print(
        f"\n[{r.name}] {r.sent}/{r.requests_planned} requests at concurrency {r.concurrency}, {r.texts_per_request} "
        f"text(s) each, {r.seconds:.1f} s{timed}"
    )
    print(f"  throughput   {s['throughput_requests_per_s']:.1f} req/s  ({s['throughput_texts_per_s']:.1f} texts/s)")
    print(f"  latency ms   p50 {s['p50_ms']:.1f}  p95 {s['p95_ms']:.1f}  p99 {s['p99_ms']:.1f}  max {s['max_ms']}")
    print(
        f"  errors       5xx {r.server_errors}  4xx {r.client_errors}  transport {r.transport_errors}   statuses "
        f"{r.status_counts}"
    )
    if r.mean_batch_size is not None:
        print(f"  server mean batch size {r.mean_batch_size} texts per model call")


async def main_async(args: argparse.Namespace) -> dict:
    base = args.url.rstrip("/")
    baseline_base = (args.baseline_url or args.url).rstrip("/")
    for url in {base, baseline_base}:
        require_loopback(url)
    key = (
        args.api_key
        or os.environ.get("DOMAINFLOW_API_KEY")
        or os.environ.get("DOMAINFLOW_API_KEYS", "").split(",")[0].strip()
    )
    if not key:
        raise SystemExit("no API key: pass --api-key or set DOMAINFLOW_API_KEY (or DOMAINFLOW_API_KEYS)")
    texts = load_texts(Path(args.texts))
    async with httpx.AsyncClient(timeout=10) as client:
        for target in {base, baseline_base}:
            try:
                ready = await client.get(f"{target}/readyz")
            except httpx.HTTPError as exc:
                raise SystemExit(f"no service at {target}: {exc}") from None
            if ready.status_code != 200:
                raise SystemExit(f"{target} is not ready: {ready.text}")

    await run_phase(
        "warm-up",
        base,
        args.domain,
        key,
        texts,
        args.warmup,
        min(args.concurrency, 4),
        args.texts_per_request,
        args.max_seconds,
    )
    load = await run_phase(
        "load", base, args.domain, key, texts, args.requests, args.concurrency, args.texts_per_request, args.max_seconds
    )
    print_phase(load)
    if baseline_base != base:
        await run_phase(
            "warm-up",
            baseline_base,
            args.domain,
            key,
            texts,
            args.warmup,
            min(args.concurrency, 4),
            args.texts_per_request,
            args.max_seconds,
        )
    baseline = await run_phase(
        "one-at-a-time" if args.baseline_concurrency == 1 else "no-batching",
        baseline_base,
        args.domain,
        key,
        texts,
        args.baseline_requests,
        args.baseline_concurrency,
        args.texts_per_request,
        args.max_seconds,
        offset=7,
    )
    print_phase(baseline)
    ratio = load.throughput_rps / baseline.throughput_rps if baseline.throughput_rps else float("nan")
    print(
        f"\nmicro-batching ratio: {ratio:.2f}x the throughput of {baseline.name} inference ({load.throughput_rps:.1f} "
        f"vs {baseline.throughput_rps:.1f} req/s)"
    )
    return {
        "load": load.summary(),
        "baseline": baseline.summary(),
        "ratio": round(ratio, 3),
        "url": base,
        "baseline_url": baseline_base,
        "domain": args.domain,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="The running service (loopback only).")
    parser.add_argument("--domain", default="customer_service")
    parser.add_argument("--requests", "-n", type=int, default=10_000, help="Requests in the load phase.")
    parser.add_argument("--concurrency", "-c", type=int, default=32)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--baseline-requests", type=int, default=500, help="Requests in the baseline phase.")
    parser.add_argument("--baseline-concurrency", type=int, default=1, help="1: one request at a time (default).")
    parser.add_argument(
        "--baseline-url", default=None, help="A second service started with --max-batch 1 (default: the same service)."
    )
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="Time bound of each phase.")
    parser.add_argument(
        "--api-key", default=None, help="Default: DOMAINFLOW_API_KEY, else the first of DOMAINFLOW_API_KEYS."
    )
    parser.add_argument("--texts", default=str(DEFAULT_TEXTS), help="CSV with a 'text' column.")
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "texts_per_request", "baseline_requests", "baseline_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.max_seconds <= 3600:
        parser.error("--max-seconds must be in (0, 3600]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if results["load"]["server_errors"] or results["baseline"]["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
