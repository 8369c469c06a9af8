"""Scheduled retraining run by a Prefect worker from a work pool, against a real local Prefect server.

`domainflow schedule --work-pool pool DOMAIN` registers the retraining deployment in a process work pool
(creating the pool) and exits; a real `prefect worker start --pool pool` process, started from another
folder with another DOMAINFLOW_HOME, picks up a run of it, and the run retrains the domain into the
registry of the home `schedule` was given (the deployment carries it), behind the same gates.

Kept small: the pet clinic domain (70 training messages), the MiniLM cut to one layer, one epoch, no
compressed candidate.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from domainflow.registry import ModelRegistry
from flows.ops_cli import ops_app
from tests.data_helpers import PET_CLINIC, copy_domain
from tests.process_helpers import (
    clean_env,
    prefect_api,
    running_prefect_server,
    session_members,
    stop_group,
    wait_for,
    wait_for_exit,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POOL = "retrain-pool"
DOMAIN = "pet_pool"
CRON = "15 3 * * 1-5"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """`domainflow ui` on a free port, SQLite under a temporary home; stopped after the module."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server-home")) as server:
        yield server


api = prefect_api


def small_pet_domain(tmp_path: Path) -> Path:
    """The pet clinic as a user's file under another name: one epoch, no compressed candidate (cheap to retrain)."""
    body = (
        (PET_CLINIC / "pet_clinic.toml")
        .read_text()
        .replace('name = "pet_clinic"', f'name = "{DOMAIN}"')
        .replace("epochs = 2.0", "epochs = 1.0")
        .replace('methods = ["onnx_int8"]', "methods = []")
    )
    assert f'name = "{DOMAIN}"' in body and "methods = []" in body and "epochs = 1.0" in body
    return copy_domain(tmp_path, DOMAIN, body)


def test_schedule_registers_in_a_work_pool_and_a_worker_retrains(
    prefect_server: SimpleNamespace, tiny_model_dir: Path, tmp_path: Path
) -> None:
    domain_file = small_pet_domain(tmp_path)
    home = tmp_path / "home"
    registered = subprocess.run(
        [
            *(sys.executable, "-m", "flows.ops_cli", "schedule", str(domain_file), "--cron", CRON),
            *("--model", str(tiny_model_dir), "--num-layers", "1"),
            *("--work-pool", POOL, "--api-url", prefect_server.api),
        ],
        cwd=PROJECT_ROOT,
        env=clean_env(home),
        capture_output=True,
        text=True,
        timeout=300,  # it registers and exits; the timeout only turns a hang into a failure
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert f"prefect worker start --pool {POOL}" in registered.stdout

    # The pool was created with the process worker's template, and the deployment is in it, on its cron, one
    # run at a time, carrying the project folder and the home the runs must use.
    pool = api(prefect_server, "GET", f"/work_pools/{POOL}")
    assert pool["type"] == "process" and "working_dir" in pool["base_job_template"]["variables"]["properties"]
    (dep,) = api(
        prefect_server, "POST", "/deployments/filter", json={"deployments": {"name": {"any_": [f"retrain-{DOMAIN}"]}}}
    )
    assert dep["work_pool_name"] == POOL and dep["paused"] is False
    assert dep["global_concurrency_limit"]["limit"] == 1
    (schedule,) = dep["schedules"]
    assert (schedule["schedule"]["cron"], schedule["active"]) == (CRON, True)
    # The code is where the worker runs: no copy, no download, just the project's folder.
    assert dep["entrypoint"] == "flows.retrain.retrain" and dep["path"] is None
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_ROOT)}}]
    assert dep["job_variables"]["env"] == {
        "DOMAINFLOW_HOME": str(home.resolve()),
        "PREFECT_LOCAL_STORAGE_PATH": str(home.resolve() / "results"),  # the task cache `domainflow run` uses
    }
    assert dep["parameters"] == {
        "domain": str(domain_file.resolve()),
        "model": str(tiny_model_dir.resolve()),
        "num_layers": 1,
    }

    # Nothing runs without a worker: start one elsewhere, with another home of its own.
    worker_home, worker_log = tmp_path / "worker-home", tmp_path / "worker.log"
    worker_home.mkdir()
    with open(worker_log, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", "test-worker"],
            cwd=worker_home,
            env=clean_env(
                worker_home,
                PREFECT_API_URL=prefect_server.api,
                PREFECT_HOME=str(worker_home / "prefect"),
                PREFECT_WORKER_QUERY_SECONDS="1",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        flow_run = api(prefect_server, "POST", f"/deployments/{dep['id']}/create_flow_run", json={})

        def finished() -> dict | None:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited with {worker.returncode}: {worker_log.read_text()[-4000:]}")
            run = api(prefect_server, "GET", f"/flow_runs/{flow_run['id']}")
            return run if run["state"]["type"] in FINAL_STATES else None

        run = wait_for(finished, "the retraining run", timeout=600, interval=1.0, log=worker_log)
        assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{worker_log.read_text()[-6000:]}"
        assert run["work_pool_name"] == POOL
        workers = api(prefect_server, "POST", f"/work_pools/{POOL}/workers/filter", json={})
        assert [w["name"] for w in workers] == ["test-worker"]

        # The run trained and promoted into the home `schedule` was given, not the worker's.
        champion = ModelRegistry(DOMAIN, root=home / "registry" / DOMAIN).champion()
        assert champion is not None and champion.version == 1
        assert champion.lineage["run_config"]["data_files"][0] == str((domain_file.parent / "train.csv").resolve())
        assert champion.metrics["test"]["accuracy"] >= 0.5
        assert not (worker_home / "registry").exists()
        # cached task results went to the home's store, not the worker's default one
        assert any((home / "results").iterdir()) and not (worker_home / "prefect" / "storage").exists()

        # SIGTERM (to the worker only, as `kill PID` or a process manager does) stops it, and it leaves nothing
        # of its session running (the flow-run processes it started have ended). Sent once the finished run's own
        # process has exited: a SIGTERM while it was still exiting left Prefect's worker waiting for ever (seen once
        # in ~10 runs: "Received SIGTERM. Sending SIGINT to the process worker", then nothing for 600 s).
        if Path("/proc/self/stat").exists():
            wait_for(
                lambda: len(session_members(worker.pid)) <= 1,
                "the finished run's process to end",
                timeout=300,
                log=worker_log,
            )
        worker.send_signal(signal.SIGTERM)
        try:
            code = wait_for_exit(worker, "the worker to stop", timeout=180, log=worker_log)  # measured 5-20 s
        except AssertionError:
            # Prefect 3.8's worker turns the first SIGTERM into a SIGINT to itself, which it sometimes swallows: the
            # log ends "Received SIGINT. Sending SIGINT to the process worker…" and the worker idles for ever (seen
            # in CI and locally, with no run in flight). Its documented escalation is what a process manager does
            # next: a second SIGTERM is a SIGKILL. Either way nothing of its session may outlive it (checked below).
            worker.send_signal(signal.SIGTERM)
            code = wait_for_exit(worker, "the worker to stop after a second SIGTERM", timeout=60, log=worker_log)
        assert code in (0, -signal.SIGTERM, -signal.SIGKILL), f"exit {code}\n{worker_log.read_text()[-3000:]}"
        if Path("/proc/self/stat").exists():
            wait_for(
                lambda: not session_members(worker.pid), "the worker's processes to end", timeout=300, log=worker_log
            )
    finally:
        stop_group(worker, signal.SIGKILL)


def test_schedule_refuses_a_work_pool_of_another_type(prefect_server: SimpleNamespace, tmp_path: Path) -> None:
    """A pool whose workers run containers elsewhere would never see this project or its registry: refused, exit 2,
    and nothing is registered in it."""
    api(prefect_server, "POST", "/work_pools/", json={"name": "docker-pool", "type": "docker"})
    result = CliRunner().invoke(
        ops_app,
        [
            *("schedule", str(small_pet_domain(tmp_path)), "--cron", CRON),
            *("--work-pool", "docker-pool", "--api-url", prefect_server.api),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "work pool 'docker-pool' is of type 'docker'" in result.output
    in_pool = api(
        prefect_server, "POST", "/deployments/filter", json={"work_pools": {"name": {"any_": ["docker-pool"]}}}
    )
    assert in_pool == []
