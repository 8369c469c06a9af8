"""Prefect's ephemeral API server must not outlive a run killed with SIGKILL.

A real child process runs a real flow on the ephemeral server and prints the server's pid; the
test SIGKILLs the child (no atexit, no cleanup) and waits for the server to stop by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.process_helpers import clean_env, process_gone, wait_for

CHILD = textwrap.dedent(
    """
    import sys, time
    from domainflow.settings import configure_environment
    configure_environment()
    from flows.prefect_server import tether_ephemeral_server
    tether_ephemeral_server()
    from prefect import flow
    from prefect.server.api.server import SubprocessASGIServer

    @flow
    def hello() -> int:
        return 1

    assert hello() == 1
    server = SubprocessASGIServer._instances[None]
    print("server", server.server_process.pid, type(server).__name__, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_the_ephemeral_server_stops_when_its_run_is_killed(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert process.stdout is not None
    seen: list[str] = []
    server_pid = None
    for line in process.stdout:
        seen.append(line)
        if line.startswith("server "):
            _, pid, kind = line.split()
            server_pid = int(pid)
            assert kind == "TetheredServer"
            break
    assert server_pid is not None, "".join(seen)[-3000:]
    assert not process_gone(server_pid), "the server should be serving while its run lives"
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        wait_for(
            lambda: process_gone(server_pid), "the orphaned Prefect server to stop by itself", timeout=30, interval=0.2
        )
    finally:
        if not process_gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def test_a_real_api_url_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.server.api.server import SubprocessASGIServer

    from flows.prefect_server import tether_ephemeral_server

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
    tether_ephemeral_server()
    assert SubprocessASGIServer._instances == {}
    monkeypatch.delenv("PREFECT_API_URL")
    tether_ephemeral_server()
    assert type(SubprocessASGIServer._instances[None]).__name__ == "TetheredServer"
