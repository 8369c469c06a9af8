"""POST an alert as JSON to a webhook (Slack-style incoming hooks, an on-call router, …).

This function makes one attempt and raises on any failure (connection refused, timeout,
a non-2xx answer), so that the caller — a Prefect task with retries — decides how often
to try again, and the flow decides that a webhook that stays down is logged, not fatal.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import httpx


class WebhookError(RuntimeError):
    """The webhook did not accept the alert."""


def redact(url: str) -> str:
    """Scheme, host and port only: webhook paths often hold a secret token, which must not reach logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


def post_json(url: str, payload: dict[str, Any], timeout: float = 5.0) -> int:
    """One POST of ``payload``; returns the HTTP status of a 2xx answer, raises :class:`WebhookError` otherwise."""
    if urlsplit(url).scheme not in {"http", "https"}:
        raise WebhookError(f"webhook URL must be http(s), got {redact(url)}")
    body = json.dumps(payload, default=str).encode("utf-8")
    try:
        response = httpx.post(
            url,
            content=body,
            headers={"Content-Type": "application/json", "User-Agent": "domainflow-monitor"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise WebhookError(f"webhook {redact(url)} unreachable: {type(exc).__name__}: {exc}") from None
    if not 200 <= response.status_code < 300:
        raise WebhookError(f"webhook {redact(url)} answered HTTP {response.status_code}: {response.text[:200]!r}")
    return response.status_code
