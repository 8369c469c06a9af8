"""The per-domain run lock, exercised with real processes holding, waiting for and dying with it.

Children are ``python -c`` processes that talk over pipes: they print what happened ("locked",
"waiting", "busy") and hold the lock until told "release" on stdin, so every step is
synchronised on a message, never on a sleep. Timeouts below only stop a hung test; nothing
asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from domainflow.runlock import DomainBusyError, domain_run_lock, lock_path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 120  # only ever reached when something is broken (a 2-core machine shared with others)

# mode "hold": take the lock (waiting if needed), report, hold until "release"; "nowait": fail at once if busy.
CHILD = r"""
import os, sys
from domainflow.runlock import DomainBusyError, domain_run_lock

domain, mode, marker = sys.argv[1], sys.argv[2], sys.argv[3]

def say(text):
    print(text.replace("\n", " "), flush=True)

try:
    waiting = lambda message: say("waiting " + message)
    with domain_run_lock(domain, wait=mode != "nowait", on_wait=waiting, description="test " + mode) as me:
        say(f"locked pid={me.pid} saw_release_marker={os.path.exists(marker)}")
        if sys.stdin.readline().strip() == "release":
            open(marker, "w").close()  # written while still holding the lock
    say("released")
except DomainBusyError as exc:
    say(f"busy holder_pid={exc.holder.pid if exc.holder else None} {exc}")
    sys.exit(3)
"""


class Child:
    """A ``python -c CHILD`` process with line-by-line reads that cannot hang the test."""

    def __init__(self, home: Path, domain: str, mode: str, marker: Path) -> None:
        env = {**os.environ, "DOMAINFLOW_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, domain, mode, str(marker)],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self.pid = self.proc.pid
        self._buffer = b""

    def line(self) -> str:
        """The child's next line (AssertionError with its stderr if it exits or hangs first)."""
        deadline = time.monotonic() + HANG_GUARD_S
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(remaining, 0))
            if not ready:
                raise AssertionError(f"child {self.pid} said nothing for {HANG_GUARD_S} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                stderr = self.proc.stderr.read().decode()
                raise AssertionError(f"child {self.pid} exited ({self.proc.wait()}): {stderr}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def send(self, text: str) -> None:
        self.proc.stdin.write(f"{text}\n".encode())
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Close its stdin (a holder then releases) and return its exit code."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.proc.wait(timeout=HANG_GUARD_S)

    def stop(self) -> None:
        """Kill it if it still runs (this test's own child, by its pid) and close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=HANG_GUARD_S)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def spawn(home: Path, tmp_path: Path):
    children: list[Child] = []

    def start(domain: str, mode: str = "hold") -> Child:
        child = Child(home, domain, mode, tmp_path / f"released-{domain}")
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


def test_a_second_process_without_waiting_is_refused_naming_the_holder(spawn, home):
    holder = spawn("toy")
    assert holder.line().startswith(f"locked pid={holder.pid}")
    record = json.loads(lock_path("toy").read_text())
    assert record["pid"] == holder.pid and record["description"] == "test hold" and record["started_at"]

    refused = spawn("toy", "nowait")
    message = refused.line()
    assert message.startswith(f"busy holder_pid={holder.pid} ")
    assert "domain 'toy' is busy" in message and f"pid {holder.pid}" in message and record["started_at"] in message
    assert "nothing was run" in message and f"kill {holder.pid}" in message
    assert refused.finish() == 3

    # the refusal changed nothing: the holder still holds, and releases normally
    holder.send("release")
    assert holder.line() == "released" and holder.finish() == 0
    assert lock_path("toy").read_text() == ""  # emptied on release: no stale holder shown to the next waiter


def test_a_waiting_process_proceeds_when_the_holder_releases(spawn):
    holder = spawn("toy")
    assert holder.line().startswith("locked")
    waiter = spawn("toy", "hold")
    waiting = waiter.line()
    assert waiting.startswith("waiting domain 'toy' is busy") and f"pid {holder.pid}" in waiting

    holder.send("release")  # the holder writes the marker while still holding, then releases
    assert holder.line() == "released"
    # The waiter got the lock, and only after the holder's last act under it.
    assert waiter.line() == f"locked pid={waiter.pid} saw_release_marker=True"
    waiter.send("release")
    assert waiter.line() == "released"
    assert holder.finish() == 0 and waiter.finish() == 0


def test_a_killed_holder_frees_the_lock(spawn):
    holder = spawn("toy")
    assert holder.line().startswith("locked")
    waiter = spawn("toy", "hold")
    assert waiter.line().startswith("waiting")

    holder.proc.kill()  # SIGKILL: no cleanup code runs in the holder
    assert holder.proc.wait(timeout=HANG_GUARD_S) == -9
    assert waiter.line() == f"locked pid={waiter.pid} saw_release_marker=False"
    assert json.loads(lock_path("toy").read_text())["pid"] == waiter.pid  # the dead holder's record is replaced
    waiter.send("release")
    assert waiter.line() == "released"

    with domain_run_lock("toy", wait=False) as me:  # and this process can take it too
        assert me.pid == os.getpid()


def test_a_lock_held_by_a_killed_process_is_free_for_the_next_run(spawn):
    holder = spawn("toy")
    assert holder.line().startswith("locked")
    holder.proc.kill()
    holder.proc.wait(timeout=HANG_GUARD_S)
    assert json.loads(lock_path("toy").read_text())["pid"] == holder.pid  # its record is left behind...
    with domain_run_lock("toy", wait=False) as me:  # ...but the lock died with it
        assert json.loads(lock_path("toy").read_text())["pid"] == me.pid


def test_different_domains_do_not_block_each_other(spawn):
    holder = spawn("alpha")
    assert holder.line().startswith("locked")
    other = spawn("beta", "nowait")
    assert other.line().startswith(f"locked pid={other.pid}")
    other.send("release")
    assert other.line() == "released" and other.finish() == 0
    with domain_run_lock("gamma", wait=False):
        with pytest.raises(DomainBusyError):
            with domain_run_lock("alpha", wait=False):
                pass


def test_waiting_with_a_timeout_calls_on_wait_once_then_gives_up(spawn):
    holder = spawn("toy")
    assert holder.line().startswith("locked")
    messages: list[str] = []
    with pytest.raises(DomainBusyError, match=rf"gave up after waiting 0\.3 s.*pid {holder.pid}") as caught:
        with domain_run_lock("toy", timeout=0.3, on_wait=messages.append):
            pytest.fail("the body must not run while another process holds the lock")
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0] and "up to 0.3 s" in messages[0]
    assert caught.value.domain == "toy" and caught.value.holder.pid == holder.pid
    assert isinstance(caught.value, RuntimeError)


def test_threads_exclude_each_other_and_nesting_in_one_run_is_allowed(home):
    outcome: dict[str, object] = {}

    def other_thread(key: str) -> None:
        try:
            with domain_run_lock("toy", wait=False):
                outcome[key] = "locked"
        except DomainBusyError as exc:
            outcome[key] = exc

    def run_in_thread(key: str) -> None:
        thread = threading.Thread(target=other_thread, args=(key,))
        thread.start()
        thread.join(HANG_GUARD_S)
        assert not thread.is_alive()

    with domain_run_lock("toy", wait=False) as outer:
        with domain_run_lock("toy", wait=False) as inner:  # a subflow of the same domain: no deadlock
            assert inner == outer
        run_in_thread("while held")  # the inner exit did not release the outer hold
    run_in_thread("after release")
    assert isinstance(outcome["while held"], DomainBusyError) and f"pid {os.getpid()}" in str(outcome["while held"])
    assert outcome["after release"] == "locked"


def test_lock_files_live_under_the_home_whatever_the_domain_name(home):
    assert lock_path("customer_service") == home.resolve() / "locks" / "customer_service.lock"
    odd = lock_path("../team/x y")
    assert odd.parent == home.resolve() / "locks" and "/" not in odd.name and odd != lock_path("../team/x-y")
    with pytest.raises(ValueError):
        lock_path("")
    with pytest.raises(ValueError):
        with domain_run_lock("toy", timeout=-1):
            pass
