"""Helpers for tests that drive real processes and a real Prefect API: ports, waits, environments, states."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
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
    condition: Callable[[], Any], what: str, timeout: float, interval: float = 0.5, log: Path | None = None
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
