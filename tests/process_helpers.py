"""Helpers for tests that drive real processes and a real Prefect API: ports, waits, environments, states."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh shell: none of this test session's Prefect / domainflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DOMAINFLOW_"))}
    env.update(DOMAINFLOW_HOME=str(home), **extra)
    return env


def wait_for(
    condition: Callable[[], Any], what: str, timeout: float = 120.0, interval: float = 0.5, log: Path | None = None
) -> Any:
    """Poll until ``condition()`` is truthy; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "\n" + log.read_text(errors="replace")[-6000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}{tail}")
        time.sleep(interval)


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started in its own session, with whatever it started (flow-run processes)."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def task_states(flow_run_id) -> dict[str, list[str]]:
    """Final state names of a flow run's task runs, by task name.

    Task-run states reach the API through Prefect's event pipeline, shortly after the flow
    returns; read again while any is still non-final (at most ~10 s: a state that never
    settles shows up in the assertion that follows)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    for _ in range(50):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if all(run.state is not None and run.state.is_final() for run in runs):
            break
        time.sleep(0.2)
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def prefect_logging_on_this_stream() -> None:
    """Set up Prefect's logging now, outside any ``CliRunner.invoke``.

    Prefect binds its console log handler to ``sys.stderr`` the first time it sets up logging (lazily,
    at the first flow run). If that first run happens inside ``CliRunner.invoke``, the handler keeps the
    runner's stream, which is closed when the command returns: every later flow run of the session then
    fails with "I/O operation on closed file" (a RecursionError in the end). Call this from a fixture
    of a test module that invokes flows through the CLI, before the first ``invoke``."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


class ThreadedUvicorn:
    """A real uvicorn server for an in-process app on 127.0.0.1 (an OS-chosen port), in a daemon thread.

    ``start()`` returns once the server accepts connections (the app's lifespan, which loads the
    champions, has run); ``stop()`` asks it to exit and waits until its thread has ended."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="test-uvicorn"
        )

    def start(self, timeout: float = 180) -> ThreadedUvicorn:
        self.thread.start()

        def started() -> bool:
            if not self.thread.is_alive():
                raise AssertionError("uvicorn exited during startup")
            return bool(self.server.started)

        wait_for(started, "uvicorn to start", timeout=timeout, interval=0.05)
        return self

    def stop(self, timeout: float = 120) -> None:
        self.server.should_exit = True
        try:
            wait_for(lambda: not self.thread.is_alive(), "uvicorn to shut down", timeout=timeout, interval=0.05)
        finally:
            self.sock.close()


def wait_for_exit(process: Any, what: str, timeout: float = 600, log: Path | None = None) -> int | None:
    """Wait until a ``multiprocessing.Process`` or ``subprocess.Popen`` has ended, and return its exit code.

    For children that import torch (seconds to tens of seconds on a busy 2-core runner): instead of a
    fixed ``join(60)`` followed by an exit-code check that fails when the child was merely slow, poll
    until it ends; the timeout only turns a hang into a failure."""
    if hasattr(process, "poll"):  # subprocess.Popen
        wait_for(lambda: process.poll() is not None, what, timeout=timeout, interval=0.1, log=log)
        return process.returncode
    wait_for(lambda: not process.is_alive(), what, timeout=timeout, interval=0.1)
    process.join()
    return process.exitcode


def process_gone(pid: int) -> bool:
    """No such process, or a zombie waiting for whoever adopted it to reap it (Linux: reads /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in {"Z", "X"}


@contextlib.contextmanager
def running_prefect_server(home: Path, *ui_args: str) -> Iterator[SimpleNamespace]:
    """`domainflow ui` on a free port (SQLite under ``home`` unless ``ui_args`` say otherwise, e.g. ``--database``)
    until the block ends; yields url, api, port, home, log and the process."""
    import sys

    import httpx

    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.ops_cli", "ui", "--port", str(port), *ui_args],
            cwd=Path(__file__).resolve().parent.parent,
            env=clean_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = SimpleNamespace(
        url=f"http://127.0.0.1:{port}",
        api=f"http://127.0.0.1:{port}/api",
        port=port,
        home=home,
        log=log,
        process=process,
    )

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the Prefect server exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{server.api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, "the Prefect server", timeout=180, log=log)
        yield server
    finally:
        stop_group(process)


def prefect_api(server: SimpleNamespace, method: str, path: str, **kwargs: Any) -> Any:
    """One Prefect API call; a 503 is retried, as Prefect's own client does (the server answers 503 for errors a
    client may retry, e.g. SQLite busy with a worker's and the scheduler's writes)."""
    import httpx

    for _ in range(20):
        response = httpx.request(method, f"{server.api}{path}", timeout=30, **kwargs)
        if response.status_code != 503:
            break
        time.sleep(0.5)
    assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def session_members(session: int) -> list[str]:
    """The processes still in a session (Linux /proc): what a command started and left behind."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended while we looked
        fields = text.rpartition(")")[2].split()  # after "pid (comm)": state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(text.split(")")[0] + ")")
    return members
