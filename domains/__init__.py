"""The shipped domains, as domain files (``*.toml`` beside this file).

They reach the catalog the way a user's installed domains do: through the ``domainflow.domains``
entry point (see pyproject.toml), so the core names none of them.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def builtin_domain_files() -> list[Path]:
    """customer_service, finance_sentiment and recommendation."""
    return sorted(FOLDER.glob("*.toml"))
