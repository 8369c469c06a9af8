"""Build a folder in private, publish it with one rename: a folder that exists is complete.

Why one helper: steps that write content-addressed folders (datasets, models, bundles) must
survive a crash mid-write (no half folder that looks finished) and a second run of the same
step at the same time (no run deleting the other's work). Each build gets its own temporary
sibling (``.<name>.<pid>-<random>.partial``); the rename is atomic on one filesystem. When
another run published the same folder first, its copy is kept (same key, same content) and
ours is discarded. Leftover temporary folders of dead processes are removed by
:func:`clean_stale_partials`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
SUFFIX = ".partial"


def build_atomically(target: Path, build: Callable[[Path], T]) -> T:
    """Run ``build(tmp)`` in a fresh private folder and rename it to ``target``.

    ``build`` writes into the folder it is given and returns a result (a record) that may name
    that folder; ``target`` must not be named inside it: the caller re-points the result.
    Returns ``build``'s result. If ``build`` raises, the private folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
    staging.mkdir()
    try:
        result = build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another run published the same key first
        return result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def clean_stale_partials(folder: Path) -> list[Path]:
    """Remove private build folders under ``folder`` whose process is gone (a crash or a kill -9)."""
    removed = []
    for path in Path(folder).rglob(f".*{SUFFIX}"):
        pid_text = path.name.rsplit(".", 2)[-2].split("-")[0] if path.name.count(".") >= 3 else ""
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
