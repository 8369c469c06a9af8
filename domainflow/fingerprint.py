"""Content fingerprints: cache keys and lineage must change when the bytes change, not the path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def path_fingerprint(path: str | Path) -> str:
    """Hash of a file, or of every file under a directory (relative names + contents)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)[:16]
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(file_digest(item).encode())
    return digest.hexdigest()[:16]


def value_fingerprint(*values: Any) -> str:
    """Stable hash of JSON-able values (configs, lists of fingerprints)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
