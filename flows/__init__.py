"""Prefect flows composing the tasks, and the command-line interface."""

from domainflow.settings import configure_environment

configure_environment()
