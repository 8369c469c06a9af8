"""A file-based model registry with atomic pointers, checksummed versions and a tolerant history.

Why files: the registry must work on one machine with no server, survive a crash at any point,
and be inspectable with ``ls`` and ``cat``. Layout under ``<home>/registry/<domain>/``::

    versions/0001/            one immutable folder per promoted model
        model/                safetensors + config + tokenizer + domainflow.json
        metrics.json          the evaluation numbers
        model_card.md         when the run produced one
        lineage.json          data fingerprints, candidate, parent, commit, config, created_at
        decision.json         the gate decision that promoted it
        manifest.json         sha256 and size of every other file in the folder (checked at load)
    champion.json             {"version": n, ...}: the pointer, replaced atomically (os.replace)
    state.json                {"next_version": n}: the version counter (numbers are never reused)
    history.jsonl             one JSON line per event: decision, rejection, promotion, rollback, ...
    decisions/<ts>-<candidate>.json   every gate decision, pass or fail
    .lock                     fcntl lock file serialising writers

Crash safety: a version is assembled in ``versions/.tmp-<uuid>`` and renamed into place in one
step; then the counter moves past its number, then its ``promotion`` record (the intent) is
appended to the history, and only then is the champion pointer swapped. A failure before the
swap removes the new folder, records ``promotion_aborted`` and leaves the old champion; a crash
there (kill -9) leaves an intent the pointer does not match, which the next writer (or
:meth:`ModelRegistry.repair`) settles the same way. So the history always explains the pointer,
and a failure after the swap cannot report a promotion that happened as a failure.

Every file is written by one helper (:func:`_write_atomic`): temp file in the same folder,
complete ``write`` loop, ``fsync``, size check, ``os.replace``. Readers never lock: every visible
file is either the old or the new whole file; a full disk raises :class:`RegistryWriteError` naming
the file and leaves the earlier state. Writers (promote, rollback, record_decision, repair) hold an
exclusive ``flock`` so two processes never claim the same version.

Only JSON is written or read here: no pickles.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from domainflow import settings
from domainflow.fingerprint import file_digest, path_fingerprint

log = logging.getLogger("domainflow.registry")

VERSION_WIDTH = 4  # versions/0001, versions/0002, ...
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_TMP_PREFIX = ".tmp-"
_TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # what _write_atomic leaves if the process dies mid-write
_CHUNK = 1 << 20
_ANY = object()  # sentinel: promote without checking which champion it replaces
_CHANGES = ("promotion", "rollback")  # history events that move the champion pointer


class RegistryError(RuntimeError):
    """The registry is missing something it should have, or an operation is not possible."""


class RegistryWriteError(RegistryError, OSError):
    """A registry file could not be written whole (full disk, short write, I/O error).

    Also an ``OSError`` so that callers that handle disk errors keep handling this one; ``path`` is
    the file that was being written, ``errno`` the operating system's error number when there was one.
    """

    def __init__(self, message: str, *, path: Path | None = None, os_errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = os_errno


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

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST_FILE


@dataclass
class RepairReport:
    """What :meth:`ModelRegistry.repair` found and did, and whether the registry is consistent now."""

    domain: str
    root: Path
    removed_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, why it was unreadable)
    backup: Path | None = None  # the history as it was, when lines were removed
    settled: list[str] = field(default_factory=list)  # interrupted promotions/rollbacks now recorded as aborted
    removed_leftovers: list[Path] = field(default_factory=list)  # temp files/folders of a process that died
    next_version: int = 1
    champion_version: int | None = None
    champion_verified: bool = False  # False for "no champion" and for a version without a manifest
    problem: str | None = None  # why the registry is not consistent; None when it is
    notes: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """champion.json is absent on an empty registry, or names an existing version whose files verify."""
        return self.problem is None

    def lines(self) -> list[str]:
        """The report as text, one finding per line (what the CLI prints)."""
        out = [f"{self.domain}: registry at {self.root}"]
        if self.removed_lines:
            out.append(f"history: removed {len(self.removed_lines)} unreadable line(s); backup at {self.backup}")
            out.extend(f"  line {number}: {why}" for number, why in self.removed_lines)
        else:
            out.append("history: every line is readable")
        out.extend(f"settled: {text}" for text in self.settled)
        out.extend(f"removed leftover: {path}" for path in self.removed_leftovers)
        out.extend(f"note: {text}" for text in self.notes)
        out.append(f"next version number: {self.next_version}")
        if self.problem is not None:
            out.append(f"NOT CONSISTENT: {self.problem}")
        elif self.champion_version is None:
            out.append("consistent: no champion yet")
        else:
            how = "files match its manifest" if self.champion_verified else "no manifest, not verified"
            out.append(f"consistent: champion.json points at v{self.champion_version} ({how})")
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


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


def _write_atomic(path: Path, chunks: Iterable[bytes]) -> int:
    """The one way a registry file is written: ``path`` holds either its old or its new whole content.

    Why each step: the temp file is in the same folder (same filesystem, so ``os.replace`` is an
    atomic rename); ``os.write`` may write fewer bytes than asked, so it is looped, and a write that
    accepts nothing is a full disk; ``fsync`` before the rename, so a power cut cannot expose an
    empty file under the final name; the size on disk is compared with the bytes handed over, so a
    short write that reported success is caught. Any ``OSError`` (ENOSPC, EIO, EDQUOT...) removes the
    temp file and raises :class:`RegistryWriteError` naming ``path``; the old file is untouched.
    Returns the number of bytes written.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    written = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    count = os.write(fd, view)
                    if count <= 0:
                        raise OSError(errno.ENOSPC, "the disk accepted no more bytes")
                    written += count
                    view = view[count:]
            os.fsync(fd)
            on_disk = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if on_disk != written:
            raise OSError(errno.EIO, f"short write: {on_disk} bytes reached the disk of {written} written")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RegistryWriteError(
            f"cannot write {path}: {exc}; the file keeps its previous content", path=path, os_errno=exc.errno
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return written


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(_jsonable(payload), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through :func:`_write_atomic` (strict JSON: NaN becomes null)."""
    _write_atomic(path, [_json_bytes(payload)])


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def _copy_file(src: str, dst: str) -> str:
    """Copy one file through the checked writer (also the hook tests use to simulate a crash mid-copy)."""
    _write_atomic(Path(dst), _file_chunks(Path(src)))
    return dst


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a model directory file by file, following symlinks (a cached model may be links into a hub cache).

    Not ``shutil.copytree``: it goes on copying after a failed file and raises a summary
    ``shutil.Error``, which would turn the first error (a full disk, naming its file) into a list.
    """
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        dirnames.sort()
        folder = dst / Path(dirpath).relative_to(src)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryWriteError(f"cannot create {folder}: {exc}", path=folder, os_errno=exc.errno) from exc
        for name in sorted(filenames):
            _copy_file(os.path.join(dirpath, name), str(folder / name))


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


# ---------------------------------------------------------------------------------------- manifests


def _version_files(folder: Path) -> list[str]:
    """Every file under a version folder except the manifest, as sorted POSIX paths relative to it.

    A symlink counts as a file (it is never written by the registry, so it shows up as extra)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        for name in [*filenames, *links]:
            rel = (base / name).relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                names.append(rel)
    return sorted(names)


def _build_manifest(folder: Path) -> dict:
    """sha256 and size of every file of a version, read back from disk after it was written."""
    files = {
        rel: {"sha256": file_digest(folder / rel), "size": (folder / rel).stat().st_size}
        for rel in _version_files(folder)
    }
    return {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}


def verify_version(info: VersionInfo) -> None:
    """Check a version's files against its ``manifest.json``; ``RegistryError`` naming the first bad file.

    Why: a version is what serving loads, and its files can be changed after promotion (a disk
    error, a hand edit, a half-finished copy back from a backup). Files are checked in path order,
    each for being missing, changed (size, then sha256) or extra. A version promoted before
    manifests existed has none: it is loaded with a warning, not refused, so older registries keep
    serving.
    """
    manifest_path = info.manifest
    if not manifest_path.is_file():
        log.warning(
            "%s v%d has no %s (promoted before manifests existed): its files are not verified",
            info.domain,
            info.version,
            manifest_path,
        )
        return
    manifest = _read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise RegistryError(f"{info.domain} v{info.version}: corrupt manifest {manifest_path}: no 'files' table")
    on_disk = set(_version_files(info.path))
    prefix = f"{info.domain} v{info.version} failed verification against {manifest_path}:"
    for rel in sorted(on_disk | set(files)):
        path = info.path / rel
        if rel not in on_disk:
            raise RegistryError(f"{prefix} {path} is missing")
        if rel not in files:
            raise RegistryError(f"{prefix} {path} is an extra file, not in the manifest")
        expected = files[rel]
        size = path.stat().st_size
        if size != expected.get("size"):
            raise RegistryError(f"{prefix} {path} changed: {size} bytes, expected {expected.get('size')}")
        digest = file_digest(path)
        if digest != expected.get("sha256"):
            raise RegistryError(f"{prefix} {path} changed: sha256 {digest}, expected {expected.get('sha256')}")


# ---------------------------------------------------------------------------------------- history replay


def _effective_changes(events: Iterable[dict]) -> list[dict]:
    """The promotion and rollback records that took effect, oldest first.

    An abort record cancels the change it names (the one just before it: writers hold the lock from
    intent to abort, so nothing can come between). A record without the fields replay needs (hand
    edits) is skipped with a warning rather than breaking rollback.
    """
    changes: list[dict] = []
    for event in events:
        kind = event.get("event")
        if kind == "promotion" and isinstance(event.get("version"), int):
            changes.append(event)
        elif kind == "rollback" and isinstance(event.get("to"), int):
            changes.append(event)
        elif kind in _CHANGES:
            log.warning("history record without its version is ignored for rollback: %s", event)
        elif kind in ("promotion_aborted", "rollback_aborted") and changes:
            last = changes[-1]
            if kind == "promotion_aborted" and last.get("event") == "promotion":
                if last.get("version") == event.get("version"):
                    changes.pop()
            elif kind == "rollback_aborted" and last.get("event") == "rollback":
                if (last.get("to"), last.get("from")) == (event.get("to"), event.get("from")):
                    changes.pop()
    return changes


def _change_target(change: dict) -> int:
    return int(change["version"] if change.get("event") == "promotion" else change["to"])


class ModelRegistry:
    """Versions, champion pointer, history and gate decisions of one domain."""

    def __init__(self, domain: str, root: Path | None = None) -> None:
        self.domain = domain
        self.root = Path(root) if root is not None else settings.registry_dir() / domain
        self.versions_dir = self.root / "versions"
        self.decisions_dir = self.root / "decisions"
        self.champion_file = self.root / "champion.json"
        self.state_file = self.root / "state.json"
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

    def get(self, version: int, *, verify: bool = False) -> VersionInfo:
        """One version; ``RegistryError`` naming the path when it is absent or incomplete.

        ``verify=True`` also checks its files against its manifest (:func:`verify_version`): use it
        where the model is about to be loaded; listing and polling skip it because it reads every byte.
        """
        path = self._version_path(version)
        if not path.is_dir():
            known = ", ".join(str(n) for n in self._version_numbers()) or "none"
            raise RegistryError(f"{self.domain}: no version {version} at {path} (known versions: {known})")
        model = path / "model"
        if not model.is_dir():
            raise RegistryError(f"{self.domain}: version {version} has no model directory: {model} is missing")
        metrics = _read_json(path / "metrics.json")
        lineage = _read_json(path / "lineage.json")
        info = VersionInfo(
            domain=self.domain,
            version=version,
            path=path,
            metrics=metrics,
            lineage=lineage,
            created_at=str(lineage.get("created_at", "")),
        )
        if verify:
            verify_version(info)
        return info

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

    def champion(self, *, verify: bool = False) -> VersionInfo | None:
        """The serving version, or None. A pointer to a missing version raises: serving must not guess.

        Cheap by default (it is polled); ``verify=True`` (or :meth:`load_champion`) checks the
        version's files against its manifest first, for callers that are about to load the model.
        """
        pointer = self.champion_pointer()
        if pointer is None:
            return None
        version = pointer["version"]
        if not self._version_path(version).is_dir():
            raise RegistryError(
                f"{self.domain}: {self.champion_file} points at version {version}, "
                f"but {self._version_path(version)} does not exist"
            )
        return self.get(version, verify=verify)

    def load_champion(self) -> VersionInfo | None:
        """The champion, its files verified against its manifest: what to call right before loading it."""
        return self.champion(verify=True)

    def _read_history(self) -> tuple[bytes, list[bytes], list[dict], list[tuple[int, str]]]:
        """(file content, its lines, readable records, unreadable lines as (line number, why))."""
        try:
            data = self.history_file.read_bytes()
        except FileNotFoundError:
            return b"", [], [], []
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        records: list[dict] = []
        bad: list[tuple[int, str]] = []
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                event = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                torn = number == len(lines) and not data.endswith(b"\n")
                bad.append((number, f"{'torn last line' if torn else 'not JSON'} ({exc})"))
                continue
            if not isinstance(event, dict):
                bad.append((number, f"not a JSON object ({type(event).__name__})"))
                continue
            records.append(event)
        return data, lines, records, bad

    def history(self) -> list[dict]:
        """All readable events, oldest first; never raises on a bad line.

        A torn or corrupt line (a crash mid-write under older versions, a disk error, a hand edit) is
        skipped with a warning naming its line number: one bad line must not hide the rest of the
        history or block rollback. :meth:`repair` rewrites the file without such lines.
        """
        _data, _lines, records, bad = self._read_history()
        for number, why in bad:
            log.warning(
                "%s line %d skipped: %s; `domainflow registry repair %s` rewrites the file without it",
                self.history_file,
                number,
                why,
                self.domain,
            )
        return records

    def decisions(self) -> list[Path]:
        """Stored gate decisions, oldest first (file names start with a UTC timestamp)."""
        if not self.decisions_dir.is_dir():
            return []
        return sorted(p for p in self.decisions_dir.glob("*.json") if not p.name.startswith("."))

    def no_champion_hint(self) -> str:
        """What to do about a missing champion, for every "no champion" message (CLI, serving, monitor, export).

        Why not always "run it first": after a run whose gate refused its challenger that advice is wrong, and
        the decision file already says why (e.g. a tie with a baseline). Reads only the newest decision.
        """
        decisions = self.decisions()
        if not decisions:
            return f"run `domainflow run {self.domain}` first"
        try:
            last = _read_json(decisions[-1])
        except RegistryError as exc:
            return f"its last decision cannot be read ({exc})"
        if last.get("promote"):
            return (
                f"its last decision ({decisions[-1].name}) promoted a model but no champion pointer names it: "
                f"`domainflow registry repair {self.domain}`"
            )
        return f"its last run promoted nothing ({decisions[-1].name}): {last.get('summary', '')}"

    def _stored_next_version(self) -> int:
        """The counter in state.json, or 0 when there is none (a registry from before the counter)."""
        if not self.state_file.exists():
            return 0
        try:
            state = _read_json(self.state_file)
        except RegistryError as exc:
            log.warning("%s; numbering from the versions and the history instead", exc)
            return 0
        value = state.get("next_version") if isinstance(state, dict) else None
        if not isinstance(value, int) or isinstance(value, bool):
            log.warning(
                "%s has no integer next_version: %r; numbering from the versions and history", self.state_file, state
            )
            return 0
        return value

    def _highest_used_version(self) -> int:
        """The highest version number any trace shows: folders, history records, the pointer."""
        used = [0, *self._version_numbers()]
        used += [
            e["version"]
            for e in self.history()
            if e.get("event") in ("promotion", "promotion_aborted") and isinstance(e.get("version"), int)
        ]
        with contextlib.suppress(RegistryError):
            pointer = self.champion_pointer()
            if pointer is not None:
                used.append(pointer["version"])
        return max(used)

    def next_version(self) -> int:
        """The number the next promotion takes: past the counter and past every number ever used.

        Why both: the counter alone is what survives the deletion of the top version folder (a
        reused number made serving keep the old in-memory model, since "same version" means "same
        model" to it); the maximum alone migrates a registry written before the counter existed and
        covers a counter file that was lost or restored from an older backup.
        """
        return max(self._stored_next_version(), self._highest_used_version() + 1)

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
        """Add one JSON line; called under the lock.

        The file is rewritten whole through :func:`_write_atomic` (a line per decision keeps it small),
        so an append is all or nothing: a full disk leaves the previous history, never a torn line. A
        torn line left by an older version of this code is kept as a line of its own (readers skip
        it; :meth:`repair` removes it and keeps a backup) instead of being silently cut off.
        """
        line = json.dumps(_jsonable(event), sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
        try:
            current = self.history_file.read_bytes()
        except FileNotFoundError:
            current = b""
        if current and not current.endswith(b"\n"):
            current += b"\n"
        _write_atomic(self.history_file, [current, line])

    def _record_abort(self, record: dict) -> None:
        """Append an abort record on the way out of a failed change; a failure here is logged, not raised:
        the original error is what the caller must see, and the next writer settles the intent anyway."""
        try:
            self._append_history(record)
        except RegistryError as exc:
            log.error(
                "%s: could not record %s (%s); the next write or `registry repair` settles it", self.domain, record, exc
            )

    def _settle_unfinished_change(self) -> str | None:
        """Record as aborted a promotion or rollback whose intent is in the history but not in the pointer.

        Called under the lock before every write. A process killed between the history record and
        the pointer swap leaves exactly that, with the pointer older than the record (its
        ``promoted_at`` is earlier, or there is no pointer yet). A pointer newer than the history
        (written by older code, which appended after the swap) or edited by hand is left alone:
        rollback follows the pointer then. Returns what was settled, for the repair report.
        """
        changes = _effective_changes(self.history())
        if not changes:
            return None
        last = changes[-1]
        try:
            pointer = self.champion_pointer()
        except RegistryError:
            return None  # a corrupt pointer is for repair to report, not for a writer to guess about
        target = _change_target(last)
        if pointer is not None:
            promoted_at = pointer.get("promoted_at")
            if pointer["version"] == target or not isinstance(promoted_at, str) or promoted_at >= str(last.get("at")):
                return None
        shown = f"v{pointer['version']}" if pointer is not None else "no version"
        where = f"{self.champion_file} still points at {shown}: the process stopped before the pointer swap"
        if last.get("event") == "promotion":
            text = f"the promotion of v{target} recorded at {last.get('at')} never took effect; {where}"
            if self._version_path(target).is_dir():
                text += f"; {self._version_path(target)} stays on disk but was never served"
            record = {"event": "promotion_aborted", "at": _now(), "version": target, "reason": text}
        else:
            text = (
                f"the rollback from v{last.get('from')} to v{target} recorded at {last.get('at')} never took effect; "
                f"{where}"
            )
            record = {"event": "rollback_aborted", "at": _now(), "from": last.get("from"), "to": target, "reason": text}
        self._append_history(record)
        log.warning("%s: %s", self.domain, text)
        return text

    def record_decision(self, decision: dict) -> Path:
        """Store a gate decision (pass or fail) under ``decisions/`` and log it in the history.

        Every decision is kept so that "why was this model (not) deployed?" has an answer with
        numbers. A decision that does not promote is logged as a ``rejection``; one that does is
        logged as ``decision`` and followed by a ``promotion`` line from :meth:`promote`. When the
        history cannot be written the decision file is removed again: both or neither.
        """
        with self._locked():
            self._settle_unfinished_change()
            self.decisions_dir.mkdir(parents=True, exist_ok=True)
            stamp = _stamp()
            candidate = _safe_name(str(decision.get("chosen") or "none"))
            path = self.decisions_dir / f"{stamp}-{candidate}.json"
            suffix = 1
            while path.exists():
                suffix += 1
                path = self.decisions_dir / f"{stamp}-{candidate}-{suffix}.json"
            _write_json_atomic(path, decision)
            try:
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
            except BaseException:
                path.unlink(missing_ok=True)
                raise
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

        Order: assemble in ``versions/.tmp-<uuid>`` (files, then ``manifest.json``) → rename to
        ``versions/<n>`` → move the counter past n → append the ``promotion`` record (the intent) →
        replace champion.json. A failure before the pointer swap removes the folder, records
        ``promotion_aborted`` when the intent was already written, and leaves the old champion in
        place; nothing is written after the swap, so a promotion that happened is never reported as
        failed. ``expected_champion`` (optional) makes the
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
            self._settle_unfinished_change()
            previous = self.champion_pointer()
            previous_version = previous["version"] if previous else None
            if expected_champion is not _ANY and expected_champion != previous_version:
                raise RegistryError(
                    f"{self.domain}: champion is v{previous_version}, not v{expected_champion} as the gate assumed; "
                    "another run promoted meanwhile: re-run the gate"
                )
            self._remove_leftovers()
            version = self.next_version()
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
            renamed = intended = False
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
                _write_json_atomic(tmp / MANIFEST_FILE, _build_manifest(tmp))  # last: it covers every file above
                _fsync_tree(tmp)
                try:
                    os.rename(tmp, final)
                except OSError as exc:
                    raise RegistryWriteError(
                        f"cannot rename {tmp} to {final}: {exc}", path=final, os_errno=exc.errno
                    ) from exc
                renamed = True
                _fsync_dir(self.versions_dir)
                _write_json_atomic(self.state_file, {"next_version": version + 1})
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
                intended = True
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
            except BaseException as exc:
                shutil.rmtree(final if renamed else tmp, ignore_errors=True)
                if intended:
                    shown = f"v{previous_version}" if previous_version is not None else "no version"
                    self._record_abort(
                        {
                            "event": "promotion_aborted",
                            "at": _now(),
                            "version": version,
                            "reason": f"{type(exc).__name__}: {exc}; v{version} removed, champion.json still {shown}",
                        }
                    )
                raise
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

    def _remove_leftovers(self) -> list[Path]:
        """Remove temp folders and temp files left by a process that died mid-write; returns them.

        Both are only created under the lock, so any found while holding it are leftovers."""
        removed: list[Path] = []
        if self.versions_dir.is_dir():
            for stale in self.versions_dir.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        for folder in (self.root, self.decisions_dir, self.versions_dir):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if _TEMP_FILE.match(entry.name) and entry.is_file():
                        with contextlib.suppress(OSError):
                            entry.unlink()
                            removed.append(entry)
        return removed

    def _champion_stack(self, current: int | None) -> list[int]:
        """Replay history into the stack of champions: promotion and pinned rollback push, an
        undo rollback pops; aborted changes do not count. The current pointer wins if history lags
        behind it (a registry written by older code, which appended after the pointer swap)."""
        stack: list[int] = []
        for event in _effective_changes(self.history()):
            if event.get("event") == "promotion":
                stack.append(int(event["version"]))
            elif event.get("mode") == "undo" and stack:
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
        there is no champion, no earlier champion, or the target is missing or fails verification
        against its manifest (rolling back onto damaged files would only swap one problem for another).
        Like a promotion, the history record is written before the pointer swap.
        """
        with self._locked():
            self._settle_unfinished_change()
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
            info = self.get(target, verify=True)  # raises naming the path if it is missing, incomplete or changed
            at = _now()
            self._append_history(
                {"event": "rollback", "at": at, "from": current, "to": target, "mode": mode, "reason": reason}
            )
            try:
                _write_json_atomic(
                    self.champion_file,
                    {"version": target, "promoted_at": at, "previous": current, "event": "rollback", "reason": reason},
                )
            except BaseException as exc:
                self._record_abort(
                    {
                        "event": "rollback_aborted",
                        "at": _now(),
                        "from": current,
                        "to": target,
                        "reason": f"{type(exc).__name__}: {exc}; champion.json still v{current}",
                    }
                )
                raise
            return info

    # ------------------------------------------------------------------ repair (locked)

    def repair(self) -> RepairReport:
        """Bring the registry back to a state every reader and writer accepts, and say whether it is consistent.

        Removes temp leftovers of a killed process; rewrites ``history.jsonl`` without unreadable
        lines (the original is kept as ``history.jsonl.bak-<timestamp>`` and a ``repair`` record says
        so); records an interrupted promotion or rollback as aborted; moves the version counter past
        every number in use; and checks that champion.json points at an existing version whose files
        match its manifest. It never changes the champion: a broken pointer is reported with the
        version the history names, for a person to decide.
        """
        report = RepairReport(self.domain, self.root)
        if not self.root.is_dir():
            report.notes.append("no registry folder: nothing was ever promoted or decided for this domain")
            return report
        with self._locked():
            report.removed_leftovers = self._remove_leftovers()
            self._repair_history(report)
            settled = self._settle_unfinished_change()
            if settled:
                report.settled.append(settled)
            else:
                self._note_last_abort(report)
            self._repair_counter(report)
            self._check_champion(report)
        return report

    def _repair_history(self, report: RepairReport) -> None:
        data, lines, _records, bad = self._read_history()
        if not bad:
            return
        backup = self.root / f"{self.history_file.name}.bak-{_stamp()}"
        _write_atomic(backup, [data])
        dropped = {number for number, _ in bad}
        kept = b"".join(
            line + b"\n" for number, line in enumerate(lines, start=1) if number not in dropped and line.strip()
        )
        _write_atomic(self.history_file, [kept])
        report.removed_lines, report.backup = bad, backup
        self._append_history(
            {"event": "repair", "at": _now(), "removed_lines": [number for number, _ in bad], "backup": backup.name}
        )

    def _note_last_abort(self, report: RepairReport) -> None:
        """Say so when the last attempt to change the champion failed: it explains why the champion is not newer."""
        kinds = ("promotion", "rollback", "promotion_aborted", "rollback_aborted")
        last = next((e for e in reversed(self.history()) if e.get("event") in kinds), None)
        if last is not None and str(last.get("event")).endswith("_aborted"):
            report.notes.append(f"the last change of champion was aborted at {last.get('at')}: {last.get('reason')}")

    def _repair_counter(self, report: RepairReport) -> None:
        stored = self._stored_next_version()
        needed = self._highest_used_version() + 1
        report.next_version = max(stored, needed)
        if stored >= needed or (needed == 1 and not self.state_file.exists()):
            return
        if self.state_file.exists():
            report.notes.append(f"{self.state_file} said next version {stored or '(unreadable)'}; set to {needed}")
        else:
            report.notes.append(
                f"created {self.state_file} (a registry from before the version counter): next {needed}"
            )
        _write_json_atomic(self.state_file, {"next_version": needed})

    def _check_champion(self, report: RepairReport) -> None:
        changes = _effective_changes(self.history())
        named = _change_target(changes[-1]) if changes else None
        try:
            pointer = self.champion_pointer()
        except RegistryError as exc:
            hint = f"the history's last champion is v{named}" if named is not None else "the history names no champion"
            report.problem = f'{exc}; {hint}: write {{"version": N}} into {self.champion_file} to choose one'
            return
        if pointer is None:
            if self._version_numbers():
                report.problem = (
                    f"{self.champion_file} is missing although versions exist ({self._version_numbers()}): "
                    "nothing would be served"
                )
            return
        version = report.champion_version = pointer["version"]
        if named != version:
            report.notes.append(
                f"champion.json says v{version} but the history's last change of champion is "
                f"{'v' + str(named) if named is not None else 'none'} (a change recorded by older code after the "
                "pointer swap, or a hand edit): rollback follows champion.json"
            )
        try:
            info = self.get(version)
        except RegistryError as exc:
            report.problem = str(exc)
            return
        if not info.manifest.is_file():
            report.notes.append(f"v{version} has no manifest (promoted before manifests existed): not verified")
            return
        try:
            verify_version(info)
        except RegistryError as exc:
            report.problem = str(exc)
            return
        report.champion_verified = True
