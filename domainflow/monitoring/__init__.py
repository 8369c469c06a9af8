"""Sentiment monitoring, one job per module; ``flows/monitor.py`` composes them into Prefect flows.

* ``config``      — ``MonitorConfig`` / ``SurgeRule`` / ``WebhookSettings``: defaults from the domain spec,
                    overrides from a file
* ``topics``      — cashtags and keyword topics of a text
* ``batch``       — reading and validating a batch file into items with stable ids
* ``store``       — the SQLite store: idempotent, chunk-committed appends; processed batches; alerts
* ``scoring``     — scoring the items a store lacks with a champion
* ``aggregation`` — counts and shares per topic and window (silent windows included)
* ``surge``       — the surge rule, as pure functions
* ``plots``       — the trend plot of an alert
* ``webhook``     — one POST of an alert
* ``replay``      — a labelled file as a timed stream with one injected surge
"""

from domainflow.monitoring.config import MonitorConfig, SurgeRule, WebhookSettings, build_config
from domainflow.monitoring.store import ScoreStore, default_store_path
from domainflow.monitoring.surge import Surge, detect_surges
from domainflow.monitoring.topics import TopicExtractor, cashtags

__all__ = [
    "MonitorConfig",
    "ScoreStore",
    "Surge",
    "SurgeRule",
    "TopicExtractor",
    "WebhookSettings",
    "build_config",
    "cashtags",
    "default_store_path",
    "detect_surges",
]
