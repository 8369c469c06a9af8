"""Prefect's temporary API server, tied to the life of the process that started it.

Without ``PREFECT_API_URL``, Prefect starts an "ephemeral" API server (a uvicorn child of ~230 MB)
on first use and stops it from an ``atexit`` hook. A run killed with SIGKILL (the OOM killer, a
process manager's last resort, ``kill -9``) runs no hook, so the server stays behind as an orphan
and every later run starts its own beside it (measured: one more leftover per killed run).

:func:`tether_ephemeral_server` puts a ``TetheredServer`` where Prefect looks for its
ephemeral server (``SubprocessASGIServer._instances[None]``, the same slot Prefect's own test
harness fills). Prefect still starts, health-checks and stops it; only the child differs: it is
this module's ``main``, which serves the same app with uvicorn and watches its parent. When the
parent is gone (the child is re-parented), it stops itself the way uvicorn stops on SIGTERM.
Portable (no ``prctl``), and it costs one thread that wakes twice a second.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import threading
from typing import Any

#: Environment Prefect gives its own ephemeral server: no UI, and the server knows it is temporary.
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_POLL_SECONDS = 0.5


def tether_ephemeral_server() -> None:
    """Make the ephemeral server Prefect starts in this process one that dies with it.

    Does nothing when ``PREFECT_API_URL`` names a real server, or when an ephemeral server is
    already registered (running, or put there by a test harness): that one is left alone.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    # Imported here, not at the top: Prefect's server module costs ~1.7 s, and commands that run no
    # flow (``domains``, ``registry``, ``--help``) should not pay it.
    from prefect.server.api.server import SubprocessASGIServer

    if None in SubprocessASGIServer._instances:
        return
    tethered = tethered_server_class()
    server: Any = object.__new__(tethered)  # not tethered(): its __new__ would hand back a registered instance
    server.__init__(None)
    SubprocessASGIServer._instances[None] = server


@functools.cache
def tethered_server_class() -> type:
    """Prefect's ``SubprocessASGIServer`` whose child process stops when this process is gone."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class TetheredServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            env = {
                **os.environ,
                **_SERVER_ENV,
                **get_current_settings().to_environment_variables(exclude_unset=True),
            }
            parent = str(os.getpid())
            command = [sys.executable, "-m", "flows.prefect_server", "--port", str(self.port), "--parent", parent]
            return subprocess.Popen(command, env=env)

    return TetheredServer


def _watch_parent(parent: int) -> None:
    """SIGTERM ourselves (uvicorn's graceful stop) once ``parent`` is no longer our parent."""
    stop = threading.Event()
    while not stop.wait(_POLL_SECONDS):
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prefect's API server for one domainflow process (internal).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="pid whose end stops this server")
    args = parser.parse_args(argv)
    if os.getppid() != args.parent:  # the parent died before we got here
        raise SystemExit(0)
    threading.Thread(target=_watch_parent, args=(args.parent,), name="parent-watch", daemon=True).start()

    import uvicorn

    # As Prefect starts its own: the app factory, loopback only, errors-only logs, lifespan on.
    # uvicorn exits with 3 when the port is taken; Prefect then picks another port and retries.
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
