"""A file-based model registry with atomic pointers.

Why files: the registry must work on one machine with no server, survive a crash at any point,
and be inspectable with ``ls`` and ``cat``. Layout under ``<home>/registry/<domain>/``::

    versions/0001/            one immutable folder per promoted model
        model/                safetensors + config + tokenizer + domainflow.json
        metrics.json          the evaluation numbers
        model_card.md         when the run produced one
        lineage.json          data fingerprints, candidate, parent, commit, config, created_at
        decision.json         the gate decision that promoted it
    champion.json             {"version": n, ...}: the pointer, replaced atomically (os.replace)
    history.jsonl             one JSON line per event: decision, rejection, promotion, rollback
    decisions/<ts>-<candidate>.json   every gate decision, pass or fail
    .lock                     fcntl lock file serialising writers

Crash safety: a version is assembled in ``versions/.tmp-<uuid>`` and renamed into place in one
step; the champion pointer is swapped with ``os.replace`` only after that; if anything fails
before the swap, the new folder is removed and the old champion stays. Readers never lock:
every visible file is either the old or the new whole file. Writers (promote, rollback,
record_decision) hold an exclusive ``flock`` so two processes never claim the same version.

Only JSON is written or read here: no pickles.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from domainflow import settings
from domainflow.fingerprint import path_fingerprint

VERSION_WIDTH = 4  # versions/0001, versions/0002, ...
_TMP_PREFIX = ".tmp-"
_ANY = object()  # sentinel: promote without checking which champion it replaces


class RegistryError(RuntimeError):
    """The registry is missing something it should have, or an operation is not possible."""


@dataclass(frozen=True)
class VersionInfo:
    """One promoted model version, as stored on disk."""

    domain: str
    version: int
    path: Path
    metrics: dict
    lineage: dict
    created_at: str

    @property
    def model_dir(self) -> Path:
        """The model directory (safetensors + config + tokenizer): what serving loads."""
        return self.path / "model"

    @property
    def model_card(self) -> Path | None:
        card = self.path / "model_card.md"
        return card if card.is_file() else None

    @property
    def decision(self) -> dict:
        """The gate decision that promoted this version (empty when none was stored)."""
        path = self.path / "decision.json"
        return _read_json(path) if path.is_file() else {}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"missing registry file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"corrupt registry file {path}: {exc}") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename/replace inside ``path`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _jsonable(value: Any) -> Any:
    """Strict JSON: NaN and infinities (which ``json`` would write as bare tokens) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that ``path`` always holds either the old or the new whole file.

    A temp file in the same directory (same filesystem, so the rename is atomic) is written,
    fsynced, then ``os.replace``-d over the target. On any failure the temp file is removed and
    the old file is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(_jsonable(payload), handle, indent=2, sort_keys=True, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _copy_file(src: str, dst: str) -> str:
    """Copy one file (the hook tests use to simulate a crash mid-copy)."""
    return shutil.copy2(src, dst)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a model directory, following symlinks (a cached model may be links into a hub cache)."""
    shutil.copytree(src, dst, symlinks=False, copy_function=_copy_file)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` before it is renamed into view, so a power cut cannot
    leave a visible version with empty files."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "none"


class ModelRegistry:
    """Versions, champion pointer, history and gate decisions of one domain."""

    def __init__(self, domain: str, root: Path | None = None) -> None:
        self.domain = domain
        self.root = Path(root) if root is not None else settings.registry_dir() / domain
        self.versions_dir = self.root / "versions"
        self.decisions_dir = self.root / "decisions"
        self.champion_file = self.root / "champion.json"
        self.history_file = self.root / "history.jsonl"
        self.lock_file = self.root / ".lock"

    def __repr__(self) -> str:
        return f"ModelRegistry(domain={self.domain!r}, root={str(self.root)!r})"

    # ------------------------------------------------------------------ reading (no lock)

    def _version_path(self, version: int) -> Path:
        return self.versions_dir / f"{version:0{VERSION_WIDTH}d}"

    def _version_numbers(self) -> list[int]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.versions_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def get(self, version: int) -> VersionInfo:
        """One version; ``RegistryError`` naming the path when it is absent or incomplete."""
        path = self._version_path(version)
        if not path.is_dir():
            known = ", ".join(str(n) for n in self._version_numbers()) or "none"
            raise RegistryError(f"{self.domain}: no version {version} at {path} (known versions: {known})")
        model = path / "model"
        if not model.is_dir():
            raise RegistryError(f"{self.domain}: version {version} has no model directory: {model} is missing")
        metrics = _read_json(path / "metrics.json")
        lineage = _read_json(path / "lineage.json")
        return VersionInfo(
            domain=self.domain,
            version=version,
            path=path,
            metrics=metrics,
            lineage=lineage,
            created_at=str(lineage.get("created_at", "")),
        )

    def versions(self) -> list[VersionInfo]:
        """Every promoted version, oldest first (incomplete ones raise: they should not exist)."""
        return [self.get(n) for n in self._version_numbers()]

    def champion_pointer(self) -> dict | None:
        """The raw champion.json, or None when nothing was ever promoted."""
        if not self.champion_file.exists():
            return None
        pointer = _read_json(self.champion_file)
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), int):
            raise RegistryError(f"corrupt champion pointer {self.champion_file}: {pointer!r}")
        return pointer

    def champion(self) -> VersionInfo | None:
        """The serving version, or None. A pointer to a missing version raises: serving must not guess."""
        pointer = self.champion_pointer()
        if pointer is None:
            return None
        version = pointer["version"]
        if not self._version_path(version).is_dir():
            raise RegistryError(
                f"{self.domain}: {self.champion_file} points at version {version}, "
                f"but {self._version_path(version)} does not exist"
            )
        return self.get(version)

    def history(self) -> list[dict]:
        """All events, oldest first. A torn last line (crash mid-append) is skipped; a corrupt
        line elsewhere raises, since history is what rollback relies on."""
        if not self.history_file.exists():
            return []
        lines = self.history_file.read_text(encoding="utf-8").splitlines()
        events = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    break
                raise RegistryError(f"corrupt line {number} in {self.history_file}: {exc}") from None
        return events

    def decisions(self) -> list[Path]:
        """Stored gate decisions, oldest first (file names start with a UTC timestamp)."""
        if not self.decisions_dir.is_dir():
            return []
        return sorted(p for p in self.decisions_dir.glob("*.json") if not p.name.startswith("."))

    # ------------------------------------------------------------------ writing (locked)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock across processes for the whole of a write (released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _append_history(self, event: dict) -> None:
        """Append one JSON line with a single write (O_APPEND); called under the lock.

        A last line without its newline is what a crash mid-append leaves: it is cut off first, so
        the history never carries a corrupt line in the middle.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_jsonable(event), sort_keys=True, allow_nan=False) + "\n"
        fd = os.open(self.history_file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                content = os.pread(fd, size, 0)
                os.ftruncate(fd, content.rfind(b"\n") + 1)
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def record_decision(self, decision: dict) -> Path:
        """Store a gate decision (pass or fail) under ``decisions/`` and log it in the history.

        Every decision is kept so that "why was this model (not) deployed?" has an answer with
        numbers. A decision that does not promote is logged as a ``rejection``; one that does is
        logged as ``decision`` and followed by a ``promotion`` line from :meth:`promote`.
        """
        with self._locked():
            self.decisions_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            candidate = _safe_name(str(decision.get("chosen") or "none"))
            path = self.decisions_dir / f"{stamp}-{candidate}.json"
            suffix = 1
            while path.exists():
                suffix += 1
                path = self.decisions_dir / f"{stamp}-{candidate}-{suffix}.json"
            _write_json_atomic(path, decision)
            self._append_history(
                {
                    "event": "decision" if decision.get("promote") else "rejection",
                    "at": _now(),
                    "candidate": decision.get("chosen"),
                    "promote": bool(decision.get("promote")),
                    "summary": decision.get("summary", ""),
                    "decision_file": str(path.relative_to(self.root)),
                }
            )
            return path

    def promote(
        self,
        model_dir: Path,
        *,
        metrics: dict,
        lineage: dict,
        decision: dict,
        model_card: Path | None = None,
        model_extras: Sequence[Path] = (),
        expected_champion: int | None | object = _ANY,
        expected_fingerprint: str | None = None,
    ) -> VersionInfo:
        """Store ``model_dir`` as the next version and make it the champion, atomically.

        Order: assemble in ``versions/.tmp-<uuid>`` → rename to ``versions/<n>`` → replace
        champion.json → append history. A failure before the pointer swap removes what was
        written and leaves the old champion in place. ``expected_champion`` (optional) makes the
        swap conditional: the gate compared the challenger with a particular champion, and if
        another run promoted meanwhile, this promotion is refused instead of replacing a model it
        was never compared with. ``model_extras`` are files that belong with the model but were made
        after it (e.g. its retrieval index): they are copied into the version's ``model/`` folder.

        ``expected_fingerprint`` (optional, the candidate's recorded
        :func:`~domainflow.fingerprint.path_fingerprint`) guards against promoting other bytes than
        the ones the gate judged: output folders can be rewritten after evaluation (another run or
        code version building the same folder). The folder is fingerprinted before the copy and the
        copy again before anything becomes visible (that catches a change during the copy); a
        mismatch raises ``RegistryError`` and leaves versions, champion and history as they were.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise RegistryError(f"cannot promote {model_dir}: not a directory")
        if not any(model_dir.iterdir()):
            raise RegistryError(f"cannot promote {model_dir}: the model directory is empty")
        if model_card is not None and not Path(model_card).is_file():
            raise RegistryError(f"model card {model_card} does not exist")
        if expected_fingerprint is not None:
            # Checked before the lock as well, so a stale candidate is refused without waiting for writers.
            self._check_fingerprint(model_dir, model_dir, expected_fingerprint)

        with self._locked():
            previous = self.champion_pointer()
            previous_version = previous["version"] if previous else None
            if expected_champion is not _ANY and expected_champion != previous_version:
                raise RegistryError(
                    f"{self.domain}: champion is v{previous_version}, not v{expected_champion} as the gate assumed; "
                    "another run promoted meanwhile: re-run the gate"
                )
            self._remove_stale_temp_dirs()
            numbers = self._version_numbers()
            version = (numbers[-1] if numbers else 0) + 1
            final = self._version_path(version)
            if final.exists():  # a stray non-directory with that name
                raise RegistryError(f"cannot create version {version}: {final} already exists")
            created_at = _now()
            full_lineage = {
                **lineage,
                "version": version,
                "previous_champion": previous_version,
                "created_at": created_at,
            }
            if expected_fingerprint is not None:
                full_lineage["verified_fingerprint"] = expected_fingerprint

            self.versions_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.versions_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            renamed = swapped = False
            try:
                tmp.mkdir()
                _copy_tree(model_dir, tmp / "model")
                if expected_fingerprint is not None:  # before the extras: they are not part of the candidate
                    self._check_fingerprint(model_dir, tmp / "model", expected_fingerprint)
                for extra in model_extras:
                    _copy_file(str(extra), str(tmp / "model" / Path(extra).name))
                _write_json_atomic(tmp / "metrics.json", metrics)
                _write_json_atomic(tmp / "lineage.json", full_lineage)
                _write_json_atomic(tmp / "decision.json", decision)
                if model_card is not None:
                    _copy_file(str(model_card), str(tmp / "model_card.md"))
                _fsync_tree(tmp)
                os.rename(tmp, final)
                renamed = True
                _fsync_dir(self.versions_dir)
                _write_json_atomic(
                    self.champion_file,
                    {
                        "version": version,
                        "promoted_at": created_at,
                        "previous": previous_version,
                        "event": "promotion",
                        "candidate": lineage.get("candidate"),
                    },
                )
                swapped = True
            finally:
                if not swapped:
                    shutil.rmtree(final if renamed else tmp, ignore_errors=True)
            self._append_history(
                {
                    "event": "promotion",
                    "at": created_at,
                    "version": version,
                    "previous": previous_version,
                    "candidate": lineage.get("candidate"),
                    "summary": decision.get("summary", ""),
                }
            )
            return self.get(version)

    def _check_fingerprint(self, candidate: Path, folder: Path, expected: str) -> None:
        """``RegistryError`` unless ``folder`` (the candidate or its copy) hashes to ``expected``."""
        actual = path_fingerprint(folder)
        if actual != expected:
            where = "" if folder == candidate else f" (found while copying it into {self.versions_dir})"
            raise RegistryError(
                f"{self.domain}: candidate folder {candidate} changed after evaluation{where}: "
                f"fingerprint {actual}, expected {expected}; nothing was promoted. "
                "Run the pipeline again so the gate judges the model that is there now."
            )

    def _remove_stale_temp_dirs(self) -> None:
        """Temp dirs are only created under the lock, so any found while holding it were left by a
        process that died mid-promotion."""
        if self.versions_dir.is_dir():
            for stale in self.versions_dir.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)

    def _champion_stack(self, current: int | None) -> list[int]:
        """Replay history into the stack of champions: promotion and pinned rollback push, an
        undo rollback pops. The current pointer wins if history lags behind it (crash between
        the pointer swap and the history append)."""
        stack: list[int] = []
        for event in self.history():
            kind = event.get("event")
            if kind == "promotion":
                stack.append(int(event["version"]))
            elif kind == "rollback":
                if event.get("mode") == "undo" and stack:
                    stack.pop()
                    if not stack or stack[-1] != event["to"]:
                        stack.append(int(event["to"]))
                else:
                    stack.append(int(event["to"]))
        if current is not None and (not stack or stack[-1] != current):
            stack.append(current)
        return stack

    def rollback(self, to_version: int | None = None, *, reason: str = "") -> VersionInfo:
        """Point the champion back at an earlier version.

        ``to_version=None`` undoes the last change of champion: it returns to the champion before
        the current one, as recorded in the history (rolling back twice walks further back, it does
        not toggle). A named version is pinned and can itself be undone. ``RegistryError`` when
        there is no champion, no earlier champion, or the target is missing.
        """
        with self._locked():
            pointer = self.champion_pointer()
            if pointer is None:
                raise RegistryError(f"{self.domain}: nothing to roll back: no champion at {self.champion_file}")
            current = pointer["version"]
            if to_version is None:
                stack = self._champion_stack(current)
                if len(stack) < 2:
                    raise RegistryError(
                        f"{self.domain}: no earlier champion to roll back to from v{current} "
                        f"(history: {self.history_file})"
                    )
                target, mode = stack[-2], "undo"
            else:
                target, mode = int(to_version), "pin"
                if target == current:
                    raise RegistryError(f"{self.domain}: v{target} is already the champion")
            info = self.get(target)  # raises naming the path if it is missing or incomplete
            at = _now()
            _write_json_atomic(
                self.champion_file,
                {"version": target, "promoted_at": at, "previous": current, "event": "rollback", "reason": reason},
            )
            self._append_history(
                {"event": "rollback", "at": at, "from": current, "to": target, "mode": mode, "reason": reason}
            )
            return info
