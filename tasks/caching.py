"""Cache keys on inputs *and* code, so that a rerun skips finished steps and a code change does not.

Prefect's ``TASK_SOURCE`` hashes only the task function's own body. Our tasks are thin wrappers
over core functions, so the code part of a key here is the source of every project module the
task's module imports, directly or through other project modules (computed from the import
statements, not listed by hand: a new import joins the key by itself). The inputs part is
Prefect's ``INPUTS``: records of paths plus content fingerprints plus the slice of the domain
spec the task uses, so a changed file or a changed spec field changes the key.

Output folders are named by the same two parts (:func:`step_dir`), so two code versions never
write the same folder.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, CachePolicy

from domainflow import process_locks, settings
from domainflow.fingerprint import value_fingerprint

#: Top-level packages of the project: imports of anything else (torch, prefect…) are not followed.
PROJECT_PACKAGES = ("domainflow", "tasks", "flows", "domains", "serving")


def module_file(name: str) -> Path | None:
    """The source file of a project module, or None for anything outside the project."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def imported_modules(path: Path, module: str) -> set[str]:
    """Project modules named by ``path``'s import statements (at any depth: lazy imports count too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    closure: set[str] = set()
    for name in names:
        parts = name.split(".")
        closure.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # parents' __init__ run too
    return {name for name in closure if module_file(name) is not None}


def module_closure(module: str) -> dict[str, Path]:
    """Every project module that importing ``module`` runs, with its file."""
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen[name] = path
        pending.extend(imported_modules(path, name) - seen.keys())
    return seen


@lru_cache(maxsize=256)
def _files_digest(files: tuple[tuple[Path, str, int, int], ...]) -> str:
    """Digest of (name, bytes) of each file; the stat fields only key the memo, so an edit is seen."""
    digest = hashlib.sha256()
    for path, name, _, _ in files:
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_fingerprint(module: str) -> str:
    """Hash of the source of ``module`` and every project module it imports, directly or not.

    Files are named relative to the project, so the same code in another checkout has the same key.
    """
    root = settings.PROJECT_ROOT
    files = []
    with process_locks.PARSING:  # see domainflow.process_locks
        closure = module_closure(module)
    for path in sorted(closure.values()):
        stat = path.stat()
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        files.append((path, name, stat.st_mtime_ns, stat.st_size))
    return _files_digest(tuple(files))


@dataclass
class ModuleSource(CachePolicy):
    """The code part of a key: the task's own name plus :func:`code_fingerprint` of its module."""

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        fn = task_ctx.task.fn
        # Tasks of one module share its code: the task's own name keeps their keys apart.
        return value_fingerprint(f"{fn.__module__}.{fn.__qualname__}", code_fingerprint(fn.__module__))


CODE_AND_INPUTS = INPUTS + ModuleSource()


def step_dir(base: Path, name: str, task_fn: Callable[..., Any], *inputs: Any) -> Path:
    """``base/<name>-<key>``: a step's output folder, named by its code and its inputs."""
    module = getattr(task_fn, "__module__", None) or getattr(getattr(task_fn, "fn", None), "__module__", "")
    key = value_fingerprint(code_fingerprint(str(module)), [_plain(value) for value in inputs])
    return base / f"{name}-{key}"


def _plain(value: Any) -> Any:
    """JSON-able form of an input (records are pydantic models)."""
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value


#: The rule every task runner obeys. Tasks hand each other absolute paths (datasets, models, reports) under the
#: domainflow home, so a task that runs in another process or on another machine (a Dask or Ray worker) must find
#: them at the same path.
SHARED_HOME_RULE = (
    "every process that runs domainflow tasks (the flow's own and each Dask or Ray worker) must see one shared "
    "DOMAINFLOW_HOME, and the domain's data files, at the same path"
)


class SharedPathError(FileNotFoundError):
    """A path handed to a task does not exist where the task runs: the shared-home rule is broken."""


def require_shared(*items: Any) -> None:
    """Fail at once, naming the path and the rule, when an input of a task is not visible here.

    Why: on a Dask or Ray worker that does not share the flow's DOMAINFLOW_HOME, a missing folder would
    otherwise surface deep inside a library as an unrelated error (or, worse, a fresh empty folder).
    ``items`` are records with a ``path`` (datasets, models) or ``report_dir`` (evaluations), lists of
    them, or plain paths.
    """
    for item in items:
        if isinstance(item, list | tuple):
            require_shared(*item)
            continue
        record = item if isinstance(item, dict) else getattr(item, "__dict__", {})
        if record.get("candidate") is not None:  # an Evaluation (or its JSON form): its model and its report folder
            require_shared(record["candidate"], record["report_dir"])
            continue
        path = record.get("path", item)
        if not os.path.exists(path):
            raise SharedPathError(
                f"{path} does not exist on host {socket.gethostname()} (pid {os.getpid()}, DOMAINFLOW_HOME="
                f"{settings.home()}): {SHARED_HOME_RULE}"
            )
