"""Cache keys on inputs *and* code, so that a rerun skips finished steps and a code change does not.

Prefect's ``TASK_SOURCE`` hashes only the task function's own body; our tasks are thin
wrappers over pure functions in the same module and in ``domainflow`` core modules, so
the key here hashes those whole files, plus the files the task's module lists in
``CACHE_DEPENDS_ON`` (project-relative paths; a folder stands for its ``.py`` files), for
tasks whose logic lives in a package of its own (``domainflow/recsys``). Inputs are records
of paths plus content fingerprints, so a changed file changes the key even when its path
does not.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import INPUTS, CachePolicy

from domainflow import settings

CORE_MODULES = (
    "domainflow/modeling.py",
    "domainflow/compression.py",
    "domainflow/onnxrt.py",
    "domainflow/records.py",
    "domainflow/fingerprint.py",
)


@dataclass
class ModuleSource(CachePolicy):
    """Hash of the source file that defines the task plus the core modules every task relies on."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> Optional[str]:
        digest = hashlib.sha256()
        # Tasks of one module share its source: the task's own name keeps their keys apart.
        digest.update(f"{task_ctx.task.fn.__module__}.{task_ctx.task.fn.__qualname__}".encode())
        task_file = inspect.getsourcefile(task_ctx.task.fn)
        declared = getattr(sys.modules.get(task_ctx.task.fn.__module__), "CACHE_DEPENDS_ON", ())
        for path in [task_file, *(settings.PROJECT_ROOT / name for name in CORE_MODULES), *_files(declared)]:
            if path and Path(path).is_file():
                digest.update(Path(path).read_bytes())
        return digest.hexdigest()


def _files(names: tuple[str, ...]) -> list[Path]:
    """The files named (a folder stands for its ``.py`` files), in a stable order."""
    files: list[Path] = []
    for name in names:
        path = settings.PROJECT_ROOT / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


CODE_AND_INPUTS = INPUTS + ModuleSource()
