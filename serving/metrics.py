"""Prometheus metrics of the service, and the ASGI middleware that records every request.

Why a registry per app (not prometheus_client's global one): tests and benchmarks build more
than one app in a process, and the global registry refuses a second metric of the same name.

Why a pure ASGI middleware rather than ``@app.middleware("http")``: Starlette's
``BaseHTTPMiddleware`` wraps every response in a stream and costs measurable throughput under
load; this one only watches the ``http.response.start`` message for the status.

Label cardinality is bounded: ``endpoint`` is the route *template* (``/v1/{domain}/predict``,
or ``unmatched``), ``domain`` is a served domain or ``other``, ``status`` a status code, so
a scanner requesting random paths cannot blow up the number of time series.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    """Every metric the service exposes on ``/metrics``."""

    def __init__(self, served_domains: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.served_domains = frozenset(served_domains)
        r = self.registry
        self.requests = Counter(
            "domainflow_requests",
            "HTTP requests by endpoint, domain and status code.",
            ["endpoint", "domain", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "domainflow_request_latency_seconds",
            "Time from request to last byte of the response.",
            ["endpoint", "domain"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Why apart from the latency above: under overload a 503 must come at once (its client retries
        # elsewhere or later), and its time is invisible in a histogram dominated by the answered requests.
        self.shed_latency = Histogram(
            "domainflow_shed_latency_seconds",
            "Time to answer a request with 503 (the admission control's refusals and no-model answers).",
            ["endpoint", "domain"],
            buckets=LATENCY_BUCKETS,  # the same bounds: answered = all - shed, bucket by bucket
            registry=r,
        )
        self.errors = Counter(
            "domainflow_errors",
            "Failed requests: kind is client (4xx), server (5xx) or inference (the model raised).",
            ["endpoint", "domain", "kind"],
            registry=r,
        )
        self.texts = Counter("domainflow_texts_predicted", "Texts classified.", ["domain"], registry=r)
        self.batch_size = Histogram(
            "domainflow_batch_size_texts",
            "Texts per model call: how much micro-batching merges concurrent requests.",
            ["domain"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge(
            "domainflow_model_version",
            "Registry version of the model being served (0: none loaded).",
            ["domain"],
            registry=r,
        )
        self.model_loads = Counter(
            "domainflow_model_loads", "Champion loads by outcome (loaded, failed).", ["domain", "outcome"], registry=r
        )
        self.queue_depth = Gauge("domainflow_queue_depth", "Requests waiting for the model.", ["domain"], registry=r)
        self.queued_texts = Gauge(
            "domainflow_queued_texts",
            "Texts waiting for the model (the admission budget's unit).",
            ["domain"],
            registry=r,
        )
        # Why a reason label: a 503 for a full queue (add capacity), a passed deadline (the backlog
        # outgrew the budget's estimate) and a client gone before its batch (client timeouts too short)
        # call for different fixes, and the status code alone cannot tell them apart.
        self.rejected = Counter(
            "domainflow_rejected_requests",
            "Requests answered 503 by the admission control, by reason: queue_full, deadline (both without a model "
            "call), client_gone (disconnected first; its queued texts were dropped), shutting_down.",
            ["domain", "reason"],
            registry=r,
        )
        for domain in self.served_domains:
            self.model_version.labels(domain).set(0)

    def domain_label(self, domain: Any) -> str:
        return domain if isinstance(domain, str) and domain in self.served_domains else "other"

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class MetricsMiddleware:
    """Counts and times every HTTP request (status as sent; an unhandled exception counts as 500)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, router: Any = None) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router  # to name the route of a request answered before routing (401, 413)

    def _route_of(self, scope: dict) -> tuple[str, dict]:
        route = scope.get("route")
        if route is not None:
            return route.path, scope.get("path_params", {})
        if self.router is not None:
            from starlette.routing import Match

            for candidate in self.router.routes:
                match, child = candidate.matches(scope)
                if match != Match.NONE:
                    return getattr(candidate, "path", "unmatched"), child.get("path_params", {})
        return "unmatched", {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint, path_params = self._route_of(scope)
            domain = self.metrics.domain_label(path_params.get("domain")) if "{domain}" in endpoint else ""
            m = self.metrics
            m.requests.labels(endpoint, domain, scope.get("method", ""), str(status_code)).inc()
            seconds = time.perf_counter() - started
            m.latency.labels(endpoint, domain).observe(seconds)
            if status_code == 503:
                m.shed_latency.labels(endpoint, domain).observe(seconds)
            if status_code >= 500:
                m.errors.labels(endpoint, domain, "server").inc()
            elif status_code >= 400:
                m.errors.labels(endpoint, domain, "client").inc()
