"""Prefect tasks: each a step from files to files, exchanging paths and small records."""

from domainflow.settings import configure_environment

configure_environment()
