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

from domainflow.settings import configure_environment

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


def prefect_server_env(host: str, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``prefect server start``: SQLite in PREFECT_HOME, no telemetry, and the UI
    told where the API is (without ``PREFECT_SERVER_UI_API_URL`` a UI on a port other than 4200
    calls the API on 4200 and shows nothing)."""
    env = dict(os.environ if base is None else base)
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
) -> None:
    """Start a local Prefect server (SQLite under the domainflow home) with its UI; Ctrl-C or SIGTERM stops it."""
    if not _port_free(host, port):
        _fail(
            f"{host}:{port} is already in use: is a Prefect server already running? Try http://{host}:{port} or "
            "choose --port"
        )
    env = prefect_server_env(host, port)
    api_url = env["PREFECT_SERVER_UI_API_URL"]
    typer.echo(f"Prefect UI: {api_url.removesuffix('/api')}   (state in {env.get('PREFECT_HOME')})")
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
) -> None:
    """Create retraining deployments on a cron schedule and run them when due.

    Keeps running; Ctrl-C or SIGTERM pauses the schedules and stops."""
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
