"""One run of a domain at a time: a per-domain lock file under ``<DOMAINFLOW_HOME>/locks/``.

Why: two runs of one domain (a scheduled retrain and a manual ``domainflow run``) share output
folders and ``<target>.partial`` build folders; run side by side, one ``rmtree``-s what the other
is writing. Prefect's deployment concurrency limit only covers runs of one deployment, not a
run started by hand, so the pipeline flows take this lock around their bodies.

Why ``fcntl.flock``: the kernel drops the lock when the last descriptor of the holding process
closes, which includes ``kill -9`` and power loss, so a dead run never leaves a stale lock that
someone must delete by hand. The lock file itself is never deleted (deleting a lock file lets two
processes hold locks on two different inodes of the same name); while held it contains the
holder's pid, host, start time and description as JSON, so a refused or waiting run can say who
is in the way. The holder empties the file before releasing it.

Scope: the lock is held per open file description, so two threads of one process exclude each
other as two processes do. Re-entering the lock for the same domain from inside its own block
(a pipeline flow running another pipeline flow of the same domain as a subflow) does not
deadlock: the held domains travel in a :mod:`contextvars` variable, which Prefect copies into the
threads and tasks it starts for a run, and which a fresh thread or process does not inherit.

Limits: ``flock`` is local to one machine (it is not reliable on NFS); a child created with
``fork`` shares the descriptor, so it keeps the lock alive until it exits too (descriptors are
not inherited across ``exec``).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from domainflow import settings

LOCKS_FOLDER = "locks"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")
_POLL_MIN_S = 0.05  # polling steps while waiting with a timeout (blocking flock has no timeout)
_POLL_MAX_S = 0.5
_READ_RETRIES = 20  # a holder writes its details just after taking the lock: give it a moment
_READ_RETRY_S = 0.025

# Domains whose lock this logical call chain holds (see the module docstring, "Scope").
_HELD: contextvars.ContextVar[tuple[tuple[str, LockHolder], ...]] = contextvars.ContextVar(
    "domainflow_run_locks", default=()
)


class DomainBusyError(RuntimeError):
    """Another run of the domain holds its run lock, and this run was told not to wait (or waited too long)."""

    def __init__(self, message: str, *, domain: str, holder: LockHolder | None, lock_path: Path) -> None:
        super().__init__(message)
        self.domain = domain
        self.holder = holder
        self.lock_path = lock_path


@dataclass(frozen=True)
class LockHolder:
    """Who holds a domain's run lock, as written into the lock file when it was taken."""

    pid: int
    host: str
    started_at: str
    description: str

    def describe(self) -> str:
        """One line for messages: ``pid 123 on host h since 2025-01-01T03:00:00+00:00 (domainflow run x)``."""
        text = f"pid {self.pid} on host {self.host} since {self.started_at}"
        return f"{text} ({self.description})" if self.description else text

    def to_json(self) -> str:
        return json.dumps(
            {"pid": self.pid, "host": self.host, "started_at": self.started_at, "description": self.description},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> LockHolder | None:
        """The holder recorded in ``text``, or None when it is empty or not (yet) a whole record."""
        try:
            data = json.loads(text)
            return cls(
                pid=int(data["pid"]),
                host=str(data["host"]),
                started_at=str(data["started_at"]),
                description=str(data.get("description", "")),
            )
        except (ValueError, TypeError, KeyError):
            return None


def lock_path(domain: str) -> Path:
    """``<home>/locks/<domain>.lock``; a domain name that is not a plain file name gets a hashed one."""
    if not domain:
        raise ValueError("a run lock needs a domain name")
    name = domain
    if not _SAFE_NAME.fullmatch(domain):
        readable = re.sub(r"[^A-Za-z0-9._-]+", "-", domain).strip("-.")[:60] or "domain"
        name = f"{readable}-{hashlib.sha256(domain.encode()).hexdigest()[:12]}"
    return settings.home() / LOCKS_FOLDER / f"{name}.lock"


def _default_description() -> str:
    """What this process is, for the holder record: its command line, shortened."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return command if len(command) <= 200 else command[:197] + "..."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> LockHolder | None:
    """The holder's record, read through our own descriptor.

    Retried briefly when it is empty, torn, or names a dead process on this host: the new holder
    may have just taken the lock and not written (or not yet replaced the previous holder's) record.
    """
    holder = None
    for attempt in range(_READ_RETRIES):
        try:
            size = os.fstat(fd).st_size
            holder = LockHolder.from_json(os.pread(fd, max(size, 1), 0).decode("utf-8", "replace"))
        except OSError:
            holder = None
        if holder is not None and (holder.host != socket.gethostname() or _pid_alive(holder.pid)):
            return holder
        if attempt + 1 < _READ_RETRIES:
            time.sleep(_READ_RETRY_S)
    return holder


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _wait_for_lock(fd: int, timeout: float | None) -> bool:
    """Block until the lock is ours (True), or until ``timeout`` seconds have passed (False)."""
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes us when the holder releases or dies
        return True
    deadline = time.monotonic() + timeout
    step = _POLL_MIN_S
    while True:
        if _try_lock(fd):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(step, remaining))
        step = min(step * 2, _POLL_MAX_S)


def _busy_message(domain: str, holder: LockHolder | None, path: Path, waited: float | None) -> str:
    who = holder.describe() if holder else "a process that has not recorded itself yet"
    stop = f"stop it (kill {holder.pid})" if holder else "stop it"
    gave_up = f"gave up after waiting {waited:g} s: " if waited is not None else ""
    return (
        f"domain {domain!r} is busy: {gave_up}another run holds its run lock ({who}; lock file {path}); "
        f"nothing was run. Wait for that run to finish and start this one again (or start it so that it waits); "
        f"if that run is stuck, {stop}: the lock is released as soon as its process exits."
    )


@contextlib.contextmanager
def domain_run_lock(
    domain: str,
    *,
    wait: bool = True,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    description: str | None = None,
) -> Iterator[LockHolder]:
    """Hold ``domain``'s run lock for the ``with`` block; yields this run's :class:`LockHolder` record.

    When another run holds the lock: with ``wait=False``, raise :class:`DomainBusyError` at once;
    otherwise call ``on_wait(message)`` once (the message names the holder) and wait, for ever
    (``timeout=None``) or up to ``timeout`` seconds, then raise :class:`DomainBusyError`.
    ``description`` goes into the lock file for others' messages (default: this command line).
    Re-entering for a domain this call chain already holds is a no-op (see the module docstring).
    """
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout}")
    held = _HELD.get()
    for name, holder in held:
        if name == domain:
            yield holder
            return

    path = lock_path(domain)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _try_lock(fd):
            busy_holder = _read_holder(fd)
            if not wait or timeout == 0:
                raise DomainBusyError(
                    _busy_message(domain, busy_holder, path, None), domain=domain, holder=busy_holder, lock_path=path
                )
            if on_wait is not None:
                who = busy_holder.describe() if busy_holder else "a process that has not recorded itself yet"
                limit = "" if timeout is None else f" (for up to {timeout:g} s)"
                on_wait(f"domain {domain!r} is busy: another run holds its run lock ({who}); waiting for it{limit}")
            if not _wait_for_lock(fd, timeout):
                last = _read_holder(fd) or busy_holder
                raise DomainBusyError(
                    _busy_message(domain, last, path, timeout), domain=domain, holder=last, lock_path=path
                )

        me = LockHolder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            description=description if description is not None else _default_description(),
        )
        # Write first, then cut off any longer leftover (a killed holder's record is never cleared by it).
        record = me.to_json().encode("utf-8")
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
        token = _HELD.set((*held, (domain, me)))
        try:
            yield me
        finally:
            try:
                _HELD.reset(token)
            except ValueError:  # exited in another context than entered: restore by value
                _HELD.set(held)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a waiter reading before the next holder writes sees "not recorded yet"
    finally:
        os.close(fd)  # releases the lock (when taken): flock locks belong to the open file description
