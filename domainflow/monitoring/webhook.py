"""POST an alert as JSON to a webhook (Slack-style incoming hooks, an on-call router, …).

A webhook URL is data that comes from a config file, a flow parameter or the environment, and
the machine that runs the monitor can usually reach things the author of that URL cannot: the
cloud metadata service (169.254.169.254, which hands out credentials), services on loopback, the
private network. So before anything is sent the host is resolved, and the alert goes out only
when every address it resolves to is globally routable, to the address that was checked (no
second lookup that a rebinding DNS server could answer differently), without following
redirects. A host that is meant to be internal (an on-call router on the company network, a
receiver on 127.0.0.1 in a test) is named in an explicit allow-list: nothing is checked for it.

:func:`deliver` makes the tries: a 5xx, a timeout or a connection error is tried again, a 4xx
or a redirect is not (the same request will get the same answer), and all tries of one alert,
waits included, end within one deadline, so a webhook that hangs cannot hold a monitoring run.
It never raises for a delivery problem: the flow records how it went on the alert.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from domainflow.monitoring.config import WEBHOOK_ALLOW_HOSTS_ENV

if TYPE_CHECKING:
    from domainflow.monitoring.config import WebhookSettings

_ALLOW_HINT = f"allow it with monitoring.webhook.allow_hosts or {WEBHOOK_ALLOW_HOSTS_ENV} if it is meant"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_RETRYABLE_4XX = frozenset({408, 429})  # "try again later" answers, not a verdict on the request

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list[tuple[Any, ...]]]


class WebhookError(RuntimeError):
    """The webhook did not accept the alert; ``retryable`` says whether another try could change that."""

    retryable = True

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the answer, when there was one


class WebhookRefused(WebhookError):
    """Not sent at all: the URL's scheme or the addresses its host resolves to are not allowed."""

    retryable = False


class WebhookRejected(WebhookError):
    """Sent, and answered with a 4xx or a redirect: the same request would get the same answer."""

    retryable = False


@dataclass(frozen=True)
class Delivery:
    """How the delivery of one alert went, in the words recorded on the alert."""

    delivered: bool
    attempts: int  # requests tried (0: refused before anything was sent)
    status: int | None  # HTTP status of the last answer, if any
    reason: str

    def summary(self) -> str:
        if self.delivered:
            return f"sent (HTTP {self.status})"
        if self.attempts == 0:
            return f"not sent: {self.reason}"
        return f"failed after {self.attempts} {'try' if self.attempts == 1 else 'tries'}: {self.reason}"


def redact(url: str) -> str:
    """Scheme, host and port only: webhook paths often hold a secret token, which must not reach logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


def normalize_host(host: str) -> str:
    """How hosts are compared with the allow-list: lower case, no IPv6 brackets, no trailing dot."""
    return host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def forbidden_reason(address: IPAddress) -> str | None:
    """Why an alert must not go to ``address`` (None: a globally routable address).

    IPv6 forms that carry an IPv4 address (``::ffff:10.0.0.1``, 6to4, NAT64) are judged by it, so a
    private address cannot be smuggled in a public-looking IPv6 one.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return forbidden_reason(embedded)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _parse_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def vet_destination(url: str, allow_hosts: Iterable[str] = (), *, resolve: Resolver | None = None) -> list[str] | None:
    """The addresses an alert to ``url`` may be sent to, or None for an allow-listed host (sent as is).

    Raises :class:`WebhookRefused` for a scheme other than http(s) or when *any* address of the
    host is not globally routable (one bad address is enough: the client could pick it), and a
    retryable :class:`WebhookError` when the name does not resolve (DNS can be down for a while).
    An IP address in the URL is judged without any lookup. ``resolve`` defaults to the system's
    ``getaddrinfo`` (looked up at call time, so a test can stand in for DNS).
    """
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise WebhookRefused(f"webhook URL must be http(s), got {redact(url)}")
    host = normalize_host(parts.hostname or "")
    if not host:
        raise WebhookRefused(f"webhook URL has no host: {redact(url)}")
    if host in {normalize_host(h) for h in allow_hosts if h.strip()}:
        return None
    literal = _parse_address(host)
    if literal is not None:
        candidates: list[str] = [host]
    else:
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            infos = (resolve or socket.getaddrinfo)(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise WebhookError(f"cannot resolve the webhook host {host!r}: {exc}") from None
        candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not candidates:
            raise WebhookError(f"the webhook host {host!r} resolves to no address")
    for candidate in candidates:
        address = _parse_address(candidate.split("%", 1)[0])
        reason = "an unparsable address" if address is None else forbidden_reason(address)
        if reason:
            via = "" if literal is not None else f" resolves to {candidate}, which"
            raise WebhookRefused(f"refused: {host}{via} is {reason}; {_ALLOW_HINT}")
    return candidates


def post_json(
    url: str,
    payload: dict[str, Any],
    timeout: float = 5.0,
    *,
    allow_hosts: Iterable[str] = (),
    resolve: Resolver | None = None,
) -> int:
    """One try: vet the destination, POST ``payload`` to the vetted address, return the 2xx status.

    The connection goes to the address that was checked, with the original ``Host`` header (and
    TLS server name, so certificates are verified against the host name), and redirects are
    answered, not followed. Raises :class:`WebhookError` (``retryable`` says whether to try again).
    """
    addresses = vet_destination(url, allow_hosts, resolve=resolve)
    body = json.dumps(payload, default=str).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "domainflow-monitor"}
    target = httpx.URL(url)
    tries: list[tuple[httpx.URL, dict[str, str], dict[str, Any]]] = (
        [(target, headers, {})]
        if addresses is None
        else [
            (
                target.copy_with(host=address.split("%", 1)[0]),
                {**headers, "Host": target.netloc.decode("ascii")},
                {"sni_hostname": target.host} if target.scheme == "https" else {},
            )
            for address in addresses
        ]
    )
    response: httpx.Response | None = None
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for i, (pinned, pinned_headers, extensions) in enumerate(tries):
            try:
                response = client.post(pinned, content=body, headers=pinned_headers, extensions=extensions)
                break
            except httpx.ConnectError as exc:
                if i + 1 < len(tries):
                    continue  # the next address of the same host, as a socket connect would
                raise WebhookError(f"webhook {redact(url)} unreachable: {type(exc).__name__}: {exc}") from None
            except httpx.HTTPError as exc:
                raise WebhookError(f"webhook {redact(url)} unreachable: {type(exc).__name__}: {exc}") from None
    assert response is not None
    status = response.status_code
    if 200 <= status < 300:
        return status
    message = f"webhook {redact(url)} answered HTTP {status}"
    if 300 <= status < 400:
        raise WebhookRejected(f"{message} (a redirect: not followed; give the final URL)", status)
    error = WebhookRejected if 400 <= status < 500 and status not in _RETRYABLE_4XX else WebhookError
    raise error(f"{message}: {response.text[:200]!r}", status)


def deliver(
    url: str,
    payload: dict[str, Any],
    settings: WebhookSettings,
    *,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    resolve: Resolver | None = None,
) -> Delivery:
    """Up to ``settings.retries + 1`` tries of :func:`post_json`, all within ``settings.deadline_seconds``.

    Only a retryable failure (5xx, 408/429, timeout, connection error, DNS) is tried again, after
    ``retry_delay_seconds``; each try's timeout is cut to what is left of the deadline, and no wait
    starts that would end past it. Never raises for a delivery problem.
    """
    log = logger or logging.getLogger("domainflow.monitoring.webhook")
    hosts: Sequence[str] = settings.resolved_allow_hosts()
    deadline = clock() + settings.deadline_seconds
    attempts, status, reason = 0, None, "no try made"
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return Delivery(False, attempts, status, f"{reason} (deadline of {settings.deadline_seconds:g}s reached)")
        try:
            # vetted again on every try: a name can resolve to other addresses a moment later
            code = post_json(url, payload, min(settings.timeout_seconds, remaining), allow_hosts=hosts, resolve=resolve)
            return Delivery(True, attempts + 1, code, "accepted")
        except WebhookRefused as exc:
            log.error("webhook %s not sent: %s", redact(url), exc)
            return Delivery(False, attempts, None, str(exc))
        except WebhookError as exc:
            attempts += 1
            reason = str(exc)
            status = exc.status
            if not exc.retryable:
                log.error("webhook %s refused the alert, not retried: %s", redact(url), exc)
                return Delivery(False, attempts, status, reason)
            if attempts > settings.retries:
                log.error("webhook %s failed %d times, giving up: %s", redact(url), attempts, exc)
                return Delivery(False, attempts, status, reason)
            if deadline - clock() <= settings.retry_delay_seconds:
                log.error(
                    "webhook %s failed %d times and the deadline is near, giving up: %s", redact(url), attempts, exc
                )
                return Delivery(
                    False, attempts, status, f"{reason} (deadline of {settings.deadline_seconds:g}s reached)"
                )
            log.warning(
                "webhook %s try %d/%d failed (%s); trying again in %gs",
                redact(url),
                attempts,
                settings.retries + 1,
                exc,
                settings.retry_delay_seconds,
            )
            sleep(settings.retry_delay_seconds)
