"""Monitoring settings: what a topic is, what a surge is, where alerts go.

A domain ships its defaults (``MonitorConfig`` on its spec: the label that counts as
negative, its keyword map); a person overrides them per run with a TOML or JSON file
(``--config``) or flow parameters, and the webhook URL can come from the environment
(``DOMAINFLOW_MONITOR_WEBHOOK_URL``) so that a secret URL never lands in a flow
parameter, a deployment or a log.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WEBHOOK_ENV = "DOMAINFLOW_MONITOR_WEBHOOK_URL"
WEBHOOK_ALLOW_HOSTS_ENV = "DOMAINFLOW_WEBHOOK_ALLOW_HOSTS"  # comma-separated, added to allow_hosts


def window_length(window: str) -> pd.Timedelta:
    """The length of a fixed pandas frequency ('15min', '1h', '1D'); ValueError for one that varies ('1W')."""
    return pd.Timedelta(pd.tseries.frequencies.to_offset(window).nanos, unit="ns")


class SurgeRule(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting in a domain or config file is an error

    """When a topic's negative items in one window count as a surge.

    A window is a surge when its negative count is at least ``min_count`` *and* either
    the count exceeds ``mean + k·std`` of the same topic's counts over the previous
    ``baseline_windows`` windows (windows without items count as 0), or the negative
    share exceeds ``mean + k·std`` of its shares over those of the previous windows that
    had items. ``min_count`` is what keeps a single item, or two, from ever being an
    alert, however quiet the topic was. ``min_excess`` is an absolute margin on top of
    ``k·std``, for topics whose baseline is perfectly flat (std 0). No judgement is made
    with fewer than ``min_history`` earlier windows in the store: a fresh store has no
    baseline yet.
    """

    window: str = Field("1h", description="pandas frequency of the aggregation windows, e.g. '15min', '1h', '1D'")
    baseline_windows: int = Field(24, ge=1, description="previous windows forming a topic's baseline")
    min_history: int = Field(6, ge=1, description="fewer earlier windows than this: no judgement")
    k: float = Field(3.0, ge=0.0, description="standard deviations above the baseline mean")
    min_excess: float = Field(1.0, ge=0.0, description="absolute margin above the baseline mean, added to k·std")
    min_share_excess: float = Field(
        0.2, ge=0.0, le=1.0, description="absolute margin on the negative share, added to k·std"
    )
    min_count: int = Field(5, ge=1, description="negative items a window needs before it can be a surge")

    @field_validator("window")
    @classmethod
    def _fixed_frequency(cls, value: str) -> str:
        """Windows are ``Timestamp.floor`` buckets, which need a fixed length (no '1M': months vary)."""
        try:
            pd.Timestamp("2024-01-01", tz="UTC").floor(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"window {value!r} is not a fixed pandas frequency such as '15min', '1h' or '1D': {exc}"
            ) from None
        return value

    @property
    def window_delta(self) -> pd.Timedelta:
        return window_length(self.window)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting in a domain or config file is an error

    """Optional POST of each new alert; failures are retried, logged and never fail the flow."""

    url: str | None = Field(None, description=f"where to POST alerts (else ${WEBHOOK_ENV}); None: no webhook")
    retries: int = Field(3, ge=0, description="more tries after a 5xx, a timeout or a connection error (not a 4xx)")
    retry_delay_seconds: float = Field(2.0, ge=0.0)
    timeout_seconds: float = Field(5.0, gt=0.0, description="of one try")
    deadline_seconds: float = Field(20.0, gt=0.0, description="all tries of one alert, waits included, end within this")
    allow_hosts: list[str] = Field(
        default_factory=list,
        description=(
            f"hosts (names or IP addresses) allowed although they are loopback, private or link-local (also "
            f"${WEBHOOK_ALLOW_HOSTS_ENV}, comma-separated); any other such host is refused"
        ),
    )

    @field_validator("allow_hosts")
    @classmethod
    def _hosts_not_urls(cls, hosts: list[str]) -> list[str]:
        """A URL or host:port here would silently never match the URL's host: say so instead."""
        for host in hosts:
            text = host.strip()
            bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
            if not bare or any(c in bare for c in "/@[] ") or (":" in bare and not _is_ip(bare)):
                raise ValueError(f"allow_hosts: {host!r} is not a host name or IP address (no scheme, port or path)")
        return [host.strip() for host in hosts]

    def resolved_url(self) -> str | None:
        return self.url or os.environ.get(WEBHOOK_ENV) or None

    def resolved_allow_hosts(self) -> list[str]:
        """The allow-list of the settings plus ``$DOMAINFLOW_WEBHOOK_ALLOW_HOSTS``: an operator can allow an
        internal receiver for every domain without editing each domain's settings."""
        from_env = [h.strip() for h in os.environ.get(WEBHOOK_ALLOW_HOSTS_ENV, "").split(",") if h.strip()]
        return [*self.allow_hosts, *from_env]


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting in a domain or config file is an error

    """Everything the monitoring flow needs besides the batch and the champion."""

    negative_label: str = Field(description="the label whose surges are alerts (finance: 'bearish')")
    keywords: dict[str, list[str]] = Field(
        default_factory=dict, description="topic -> words or phrases that tag a text with it"
    )
    cashtags: bool = Field(True, description="tag texts with the tickers they mention ($AAPL -> topic '$AAPL')")
    surge: SurgeRule = Field(default_factory=SurgeRule)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    score_chunk_size: int = Field(256, ge=1, description="items scored and committed per transaction")

    @model_validator(mode="after")
    def _clean_keywords(self) -> MonitorConfig:
        for topic, words in self.keywords.items():
            if not topic.strip():
                raise ValueError("keyword map: a topic name is empty")
            if not words or any(not isinstance(w, str) or not w.strip() for w in words):
                raise ValueError(f"keyword map: topic {topic!r} needs a non-empty list of non-empty words")
        return self


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key != "keywords":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON file of overrides (same shape as :class:`MonitorConfig`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"monitoring config {path} does not exist")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"monitoring config {path}: {exc}") from None
    raise ValueError(f"monitoring config {path}: expected a .toml or .json file")


def build_config(
    defaults: MonitorConfig, overrides: Mapping[str, Any] | None = None, *, replace_keywords: bool | None = None
) -> MonitorConfig:
    """The domain's defaults with ``overrides`` applied.

    ``keywords`` in the overrides *add to* (and per topic replace) the domain's map, unless
    ``replace_keywords`` (or the overrides' own ``replace_keywords = true``) asks to start empty.
    """
    overrides = dict(overrides or {})
    replace = bool(overrides.pop("replace_keywords", False)) if replace_keywords is None else replace_keywords
    overrides.pop("replace_keywords", None)
    merged = _deep_merge(defaults.model_dump(), overrides)
    if "keywords" in overrides and not replace:
        merged["keywords"] = {**defaults.keywords, **overrides["keywords"]}
    return MonitorConfig.model_validate(merged)
