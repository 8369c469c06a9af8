"""Business domains. Each module builds a :class:`~domains.base.DomainSpec` and registers it."""

from __future__ import annotations

import importlib

from domains.base import (
    CompressionDefaults,
    DataSource,
    DomainSpec,
    QualityGates,
    RetrievalFallback,
    TrainingDefaults,
    get_domain,
    list_domains,
    register,
)

BUILTIN_DOMAIN_MODULES = ("domains.customer_service", "domains.finance_sentiment", "domains.recommendation")

__all__ = [
    "CompressionDefaults",
    "DataSource",
    "DomainSpec",
    "QualityGates",
    "RetrievalFallback",
    "TrainingDefaults",
    "get_domain",
    "list_domains",
    "register",
    "load_builtin_domains",
]


def load_builtin_domains() -> None:
    """Import the shipped domain modules (each registers itself on import)."""
    for module in BUILTIN_DOMAIN_MODULES:
        importlib.import_module(module)
