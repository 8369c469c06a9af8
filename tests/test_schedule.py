"""Scheduled retraining and the Prefect UI, against a real local Prefect server.

One Prefect server for the module, started the way a person starts it (``domainflow ui`` on a
port other than 4200, SQLite in a temporary home). ``domainflow schedule`` runs as a process,
as it would in production: its deployment must appear in the API with the right cron and time
zone, the server must schedule runs at those times, and a run of the deployment (executed by
the ``serve`` runner in its own process) must train on the newest data file, go through the
gates, publish its artifacts, and promote into the registry. Stopping it pauses the schedule.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from typer.testing import CliRunner

from domainflow.registry import ModelRegistry
from flows.ops_cli import ops_app, prefect_server_env
from flows.retrain import pick_data_files, training_files
from tasks.artifacts import artifact_key
from tests.conftest import TINY_LABELS
from tests.data_helpers import banking77_slice, write_csv
from tests.process_helpers import (
    clean_env,
    free_port,
    prefect_api,
    running_prefect_server,
    session_members,
    stop_group,
    wait_for,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEDULED_DOMAIN = "cs_sched"
CRON = "15 3 * * 1-5"  # 03:15 on weekdays
TIMEZONE = "Europe/Paris"

# A domain registered outside domains/, as a user's private domain would be: the scheduled run
# executes in a fresh process and must import it again (--domain-module).
PLUGIN = """
from domainflow.catalog import get_domain, register

_spec = get_domain("customer_service")
register(
    _spec.replace(
        name="cs_sched",
        description="Banking77, six intents (scheduled retraining test)",
        gates=_spec.gates.replace(min_metrics={"accuracy": 0.5}),
        training=_spec.training.replace(epochs=1.0, batch_size=16),
        min_examples_per_class=3,
        compression=_spec.compression.replace(methods=("dynamic_int8",)),
    )
)
"""


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """`domainflow ui` on a free port, SQLite under a temporary home; stopped after the module."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server-home")) as server:
        yield server


api = prefect_api


def wait_for_deployment(
    server: SimpleNamespace, name: str, process: subprocess.Popen, log: Path, *, unpaused: bool = False
) -> dict:
    """The deployment ``name`` once `schedule` has registered it (a schedule process that exits fails the wait)."""

    def deployment() -> dict | None:
        if process.poll() is not None:
            raise AssertionError(f"schedule exited with {process.returncode}: {log.read_text()[-4000:]}")
        found = api(server, "POST", "/deployments/filter", json={"deployments": {"name": {"any_": [name]}}})
        return found[0] if found and not (unpaused and found[0]["paused"]) else None

    return wait_for(deployment, "the deployment", timeout=180, log=log)  # the runner may not have started yet


def run_now(server: SimpleNamespace, dep: dict, log: Path) -> tuple[dict, dict]:
    """Start a run of ``dep`` as the UI's "Quick run" does; (the flow run, its final state) once it ends."""
    flow_run = api(server, "POST", f"/deployments/{dep['id']}/create_flow_run", json={})

    def finished() -> dict | None:
        state = api(server, "GET", f"/flow_runs/{flow_run['id']}")["state"]
        return state if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    return flow_run, wait_for(finished, "the retraining run", timeout=480, interval=1.0, log=log)


# ------------------------------------------------------------------------------------ data pickup


def _touch(path: Path, age_seconds: float) -> Path:
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


def test_retraining_picks_the_newest_training_file(tiny_domain: str, tmp_path: Path) -> None:
    rows = banking77_slice("train", TINY_LABELS[:3], 5)
    old = _touch(write_csv(tmp_path / "train.csv", rows), 3600)
    new = _touch(write_csv(tmp_path / "train-2026-06.csv", rows), 60)
    _touch(write_csv(tmp_path / "train_b.jsonl.part", rows), 0)  # a copy in progress
    _touch(write_csv(tmp_path / ".train-next.csv", rows), 0)  # hidden: not dropped yet
    _touch(write_csv(tmp_path / "training-notes.txt", rows), 0)  # not a data file
    write_csv(tmp_path / "test.csv", rows)

    train, test, older = pick_data_files(tiny_domain, tmp_path)
    assert (train, test, older) == (new, tmp_path / "test.csv", [old])

    parquet = tmp_path / "train-2026-07.parquet"
    parquet.write_bytes(b"")
    assert training_files(tmp_path)[0] == parquet  # any supported format, by time
    os.utime(new, (time.time() + 10, time.time() + 10))
    assert training_files(tmp_path)[0] == new

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no training file"):
        pick_data_files(tiny_domain, empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pick_data_files(tiny_domain, tmp_path / "missing")


# ------------------------------------------------------------------------------------ command-line checks


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cron", "61 * * * *"], "Invalid cron string"),
        (["--cron", "every day"], "Invalid cron string"),
        (["--cron", "0 3 * * *", "--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["--cron", "0 3 * * *", "no_such_domain"], "unknown domain 'no_such_domain'"),
        (["--cron", "0 3 * * *", "--domain-module", "no_such_module_xyz"], "cannot import domain module"),
        (
            ["--cron", "0 3 * * *", "--api-url", "http://127.0.0.1:9/api"],
            "no Prefect server answers at http://127.0.0.1:9/api",
        ),
    ],
)
def test_schedule_rejects_bad_input_before_serving(tiny_domain: str, args: list[str], message: str) -> None:
    domain = [] if "no_such_domain" in args else [tiny_domain]
    result = CliRunner().invoke(ops_app, ["schedule", *domain, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_ui_refuses_a_busy_port(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_exec(*args: Any) -> None:  # safety net: a passing port check would replace pytest
        raise AssertionError("ui tried to start a server")

    monkeypatch.setattr(os, "execve", must_not_exec)
    monkeypatch.setattr(subprocess, "Popen", must_not_exec)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = CliRunner().invoke(ops_app, ["ui", "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 2 and "already in use" in result.output


def test_ui_environment_names_the_api_on_any_port() -> None:
    env = prefect_server_env("0.0.0.0", 4555, base={"PREFECT_API_URL": "http://elsewhere:4200/api"})
    assert env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:4555/api"
    assert "PREFECT_API_URL" not in env and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


# ------------------------------------------------------------------------------------ stopping


STOP_KEY = "stop-test-key-5c1e9a7b3d"


def port_free(port: int) -> bool:
    """Whether a new server could bind the port now (as servers do, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stuck_request(port: int, path: str, headers: str = "") -> socket.socket:
    """A client whose request never completes: its headers promise a body that never comes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
        "Content-Length: 100\r\n\r\n{".encode()
    )
    return sock


def sigterm_stops(process: subprocess.Popen, port: int, path: str, log: Path, headers: str = "") -> None:
    """SIGTERM to the process (not its group: what `kill PID` or a process manager does) while a client has a
    request in flight; the command must exit, free its port and leave no process of its session behind."""
    with stuck_request(port, path, headers):
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)  # only turns a hang into a failure
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 90 s after SIGTERM\n{log.read_text()[-4000:]}") from None
    assert process.returncode in (0, -signal.SIGTERM), f"exit {process.returncode}\n{log.read_text()[-4000:]}"
    wait_for(lambda: port_free(port), f"port {port} to be free", timeout=30, log=log)
    if Path("/proc/self/stat").exists():
        wait_for(lambda: not session_members(process.pid), "the command's processes to end", timeout=30, log=log)


def test_ui_stops_on_sigterm_with_its_server_even_with_a_request_in_flight(tmp_path: Path) -> None:
    """Measured before: `prefect server start` (uvicorn) waits for every open request on SIGTERM, without limit."""
    port, log = free_port(), tmp_path / "ui.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.ops_cli", "ui", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=clean_env(tmp_path / "home"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"ui exited with {process.returncode}: {log.read_text()[-3000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "the Prefect server", timeout=180, log=log)
        sigterm_stops(process, port, "/api/flow_runs/filter", log)
    finally:
        stop_group(process, signal.SIGKILL)


def test_serve_stops_on_sigterm_even_with_a_request_in_flight(tmp_path: Path) -> None:
    """`domainflow serve` of a domain without a champion yet (not ready, but up), stopped by SIGTERM."""
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.ops_cli", "serve", "customer_service", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=clean_env(tmp_path / "home", DOMAINFLOW_API_KEYS=STOP_KEY),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}: {log.read_text()[-3000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, "`serve` to answer", timeout=180, log=log)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 503  # no champion yet
        sigterm_stops(process, port, "/v1/customer_service/predict", log, headers=f"X-API-Key: {STOP_KEY}\r\n")
    finally:
        stop_group(process, signal.SIGKILL)


def test_schedule_pauses_its_deployment_and_stops_on_sigterm(prefect_server: SimpleNamespace, tmp_path: Path) -> None:
    """SIGTERM to `domainflow schedule` (the process only): it pauses what it scheduled, then exits."""
    data, log = tmp_path / "data", tmp_path / "schedule.log"
    data.mkdir()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "flows.ops_cli", "schedule", "customer_service", "--cron", CRON),
                *("--data-dir", str(data), "--api-url", prefect_server.api),
            ],
            cwd=PROJECT_ROOT,
            env=clean_env(tmp_path / "home", PREFECT_RUNNER_POLL_FREQUENCY="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        dep = wait_for_deployment(
            prefect_server, "retrain-customer_service", process, log, unpaused=True
        )  # the runner may not have started yet
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)  # only turns a hang into a failure
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 90 s after SIGTERM\n{log.read_text()[-4000:]}") from None
        assert process.returncode in (0, -signal.SIGTERM), f"exit {process.returncode}\n{log.read_text()[-4000:]}"
        assert api(prefect_server, "GET", f"/deployments/{dep['id']}")["paused"] is True  # paused before it exited
        if Path("/proc/self/stat").exists():
            wait_for(lambda: not session_members(process.pid), "the command's processes to end", timeout=30, log=log)
    finally:
        stop_group(process, signal.SIGKILL)


# ------------------------------------------------------------------------------------ against the server


def test_ui_is_served_with_the_right_api_url(prefect_server: SimpleNamespace) -> None:
    settings = httpx.get(f"{prefect_server.url}/ui-settings", timeout=10).json()
    assert settings["api_url"] == prefect_server.api  # not :4200, where nothing runs
    page = httpx.get(prefect_server.url + "/", timeout=10, follow_redirects=True)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert prefect_server.port != 4200


def test_scheduled_deployment_retrains_on_the_newest_file_behind_the_gates(
    prefect_server: SimpleNamespace, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The domain's data folder: last month's file, and this month's drop (newer, more rows).
    data = tmp_path / "data"
    _touch(write_csv(data / "train.csv", banking77_slice("train", TINY_LABELS, 24)), 86_400)
    write_csv(data / "train-2026-06.csv", banking77_slice("train", TINY_LABELS, 30))
    write_csv(data / "test.csv", banking77_slice("test", TINY_LABELS, 12))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "df_test_domains.py").write_text(PLUGIN)
    home = tmp_path / "home"
    log = tmp_path / "schedule.log"

    env = clean_env(
        home,
        PYTHONPATH=os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.ops_cli",
                "schedule",
                SCHEDULED_DOMAIN,
                "--cron",
                CRON,
                "--timezone",
                TIMEZONE,
                "--data-dir",
                str(data),
                "--model",
                str(tiny_model_dir),
                "--domain-module",
                "df_test_domains",
                "--api-url",
                prefect_server.api,
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        dep = wait_for_deployment(prefect_server, f"retrain-{SCHEDULED_DOMAIN}", process, log)
        (schedule,) = dep["schedules"]
        assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"], schedule["active"]) == (
            CRON,
            TIMEZONE,
            True,
        )
        assert dep["paused"] is False and dep["entrypoint"] == "flows.retrain.retrain"
        assert dep["parameters"] == {
            "domain": SCHEDULED_DOMAIN,
            "data_dir": str(data.resolve()),
            "model": str(tiny_model_dir.resolve()),
            "domain_modules": ["df_test_domains"],
        }
        assert set(dep["tags"]) == {"domainflow", "retrain", SCHEDULED_DOMAIN}
        flow = api(prefect_server, "GET", f"/flows/{dep['flow_id']}")
        assert flow["name"] == "retrain"

        # The server's scheduler has put future runs on the calendar, at 03:15 Paris time on weekdays.
        def scheduled_runs() -> list[dict]:
            return api(
                prefect_server,
                "POST",
                "/flow_runs/filter",
                json={
                    "flow_runs": {"deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}
                },
            )

        upcoming = wait_for(scheduled_runs, "scheduled runs", timeout=120, log=log)
        for run in upcoming:
            local = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00")).astimezone(
                ZoneInfo(TIMEZONE)
            )
            assert (local.hour, local.minute) == (3, 15) and local.weekday() < 5, local

        # Run it now, as "Quick run" in the UI does; the serve process executes it.
        flow_run, state = run_now(prefect_server, dep, log)
        assert state["type"] == "COMPLETED", f"{state}\n{log.read_text()[-6000:]}"

        # The pipeline ran as a subflow of the retraining run, and both are in the API.
        children = api(
            prefect_server,
            "POST",
            "/flow_runs/filter",
            json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run["id"]]}}},
        )
        assert [c["state"]["type"] for c in children] == ["COMPLETED"]
        # Its artifacts are visible: which file was used (the retraining run), the gate's decision
        # and the candidates table (the pipeline run).
        used = api(
            prefect_server,
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"key": {"any_": [artifact_key(SCHEDULED_DOMAIN, "retrain-data")]}}},
        )
        assert [a["flow_run_id"] for a in used] == [flow_run["id"]]
        assert (
            "train-2026-06.csv" in used[0]["data"].split("Older training files")[0] and "`train.csv`" in used[0]["data"]
        )
        published = api(
            prefect_server,
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [children[0]["id"]]}}},
        )
        keys = {a["key"] for a in published}
        assert artifact_key(SCHEDULED_DOMAIN, "gate-decision") in keys, keys
        assert any(a["type"] == "table" for a in published), keys

        # Behind the gates: the decision is recorded, and the promoted model was trained on the new drop.
        registry = ModelRegistry(SCHEDULED_DOMAIN, root=home / "registry" / SCHEDULED_DOMAIN)
        events = [e["event"] for e in registry.history()]
        assert events[-2:] == ["decision", "promotion"], events
        champion = registry.champion()
        assert champion is not None and champion.version == 1
        assert champion.lineage["run_config"]["data_files"] == [
            str((data / "train-2026-06.csv").resolve()),
            str((data / "test.csv").resolve()),
        ]
        assert champion.metrics["test"]["accuracy"] >= 0.5
    finally:
        stop_group(process)

    # Stopping the schedule process pauses the deployment: no runs pile up with nobody to run them.
    wait_for(
        lambda: api(prefect_server, "GET", f"/deployments/{dep['id']}")["paused"],
        "the deployment to be paused",
        timeout=60,
        log=log,
    )


def test_a_domain_file_added_by_name_is_scheduled_and_retrained(
    prefect_server: SimpleNamespace, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A user's domain file, recorded with `domains add`, scheduled by its name: the run (a fresh
    process started by the Prefect runner) finds it through the home and deploys a champion."""
    from tests.data_helpers import PET_CLINIC, copy_domain

    body = (PET_CLINIC / "pet_clinic.toml").read_text().replace('name = "pet_clinic"', 'name = "pet_sched"')
    domain_file = copy_domain(tmp_path, "pet_sched", body)
    home = tmp_path / "home"
    env = clean_env(home, PREFECT_RUNNER_POLL_FREQUENCY="1")
    cli = [sys.executable, "-m", "flows.cli"]
    added = subprocess.run(
        [*cli, "domains", "add", str(domain_file)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert added.returncode == 0, added.stderr
    log = tmp_path / "schedule.log"
    command = [*cli, "schedule", "pet_sched", "--cron", CRON, "--model", str(tiny_model_dir), "--num-layers", "1"]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--api-url", prefect_server.api],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        dep = wait_for_deployment(prefect_server, "retrain-pet_sched", process, log)
        assert dep["parameters"]["domain"] == "pet_sched"  # by name: the runs find the file through the home
        assert dep["global_concurrency_limit"]["limit"] == 1  # one retraining of a domain at a time
        flow_run, state = run_now(prefect_server, dep, log)
        assert state["type"] == "COMPLETED", f"{state}\n{log.read_text()[-6000:]}"
        champion = ModelRegistry("pet_sched", root=home / "registry" / "pet_sched").champion()
        assert champion is not None and champion.lineage["labels"] == sorted(champion.lineage["labels"])
        assert champion.lineage["run_config"]["data_files"][0] == str((domain_file.parent / "train.csv").resolve())
    finally:
        stop_group(process)
