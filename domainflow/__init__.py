"""domainflow core: the pieces every task and flow shares (settings, records, model I/O, registry, metrics)."""

__version__ = "0.1.0"
