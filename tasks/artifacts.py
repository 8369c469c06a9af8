"""Helpers shared by the tasks that publish Prefect artifacts."""

from __future__ import annotations

import base64
import re
from pathlib import Path


def artifact_key(domain: str, suffix: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes ("customer_service" does not pass)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{domain}-{suffix}".lower()).strip("-")


def png_data_uri(path: Path) -> str:
    """A PNG inlined as a data: URI, so an image artifact needs no file server."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
