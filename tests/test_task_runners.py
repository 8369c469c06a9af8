"""Task runners and several domains at once: a real Dask cluster (a scheduler and two worker processes started
here), real `domainflow run` invocations, the real MiniLM cut to one layer, the pet clinic's own data.

What costs time is kept to three pipeline computations (the default run of one domain, then that domain again
with ``--refresh-cache`` beside a second domain, both on Dask). The pet clinic's domain file asks for no
compression here: the int8 export and its memory probe are the slowest steps of a tiny run and are the same code
on every runner (their submission on Dask was checked by hand, see the report).

Ray gets one run of its own (domain a again, every step recomputed, on a local Ray cluster this process starts
the way ``domainflow run --task-runner ray`` does): its cluster costs ~30 s to start and its workers import torch
afresh, so it is kept to that one comparison.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from domainflow.records import ModelRef
from domainflow.registry import ModelRegistry
from flows.cli import app
from flows.runners import ClusterSetupError, drain_prefect_services, start_runner, worker_environment
from tasks.caching import SHARED_HOME_RULE, SharedPathError, require_shared
from tasks.compress import quantize
from tests.data_helpers import PET_CLINIC, copy_domain
from tests.process_helpers import task_states

SEED = "11"
# The pet clinic without compression candidates (see the module's docstring), one domain per name.
BODY = (PET_CLINIC / "pet_clinic.toml").read_text().replace('methods = ["onnx_int8"]', "methods = []")
COMPUTED = ("ingest", "linear-probe", "finetune", "evaluate", "measure-speed")


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """A real local Dask cluster (a scheduler, two worker processes of one thread each), as a user would start
    one with `dask scheduler` / `dask worker`; the runs below connect to it with --dask-address."""
    pytest.importorskip("prefect_dask", reason="the `dask` extra is not installed: pip install -e '.[dask]'")
    import distributed

    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env=worker_environment(threads=1),
    ) as cluster:
        yield cluster
        with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
            client.run(drain_prefect_services)  # the workers' last events reach the API; they then exit at once


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runner-domains")
    return {
        name: copy_domain(folder, name, BODY.replace('name = "pet_clinic"', f'name = "{name}"'))
        for name in ("pet_runner_a", "pet_runner_b")
    }


def _run(*args: str) -> Any:
    return CliRunner().invoke(app, ["run", *args])


def _json(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _common(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--num-layers", "1", "--epochs", "1", "--seed", SEED, "--json"]


@pytest.fixture(scope="module")
def runs(dask_cluster: Any, domains: dict[str, Path], tiny_model_dir: Path) -> dict[str, Any]:
    """Domain a on the default runner; then a again (every step recomputed) beside domain b, both on Dask."""
    common = _common(tiny_model_dir)
    default = _json(_run(str(domains["pet_runner_a"]), *common))
    address = dask_cluster.scheduler_address
    both = _json(
        _run(
            str(domains["pet_runner_a"]),
            str(domains["pet_runner_b"]),
            *common,
            "--dask-address",
            address,
            "--refresh-cache",
        )
    )
    # The scheduler runs in this process: the kinds of task it was given (a key's prefix is the task's name).
    return {
        "default": default,
        "both": both,
        "dask_tasks": set(dask_cluster.scheduler.task_prefixes),
        "model_dir": tiny_model_dir,
    }


def test_dask_reaches_the_champion_metrics_of_the_default_runner(runs: dict[str, Any]) -> None:
    default, on_dask = runs["default"], runs["both"]["summaries"]["pet_runner_a"]
    assert default["task_runner"] == "ThreadPoolTaskRunner"
    assert on_dask["task_runner"] == "DaskTaskRunner"
    assert runs["both"]["task_runner"].startswith("dask at tcp://")
    # --refresh-cache: every step ran again, on the cluster's workers (the scheduler saw them).
    states = task_states(on_dask["flow_run_id"])
    assert {name: set(states[name]) for name in COMPUTED} == {name: {"Completed"} for name in COMPUTED}, states
    assert len(states["evaluate"]) == 2
    assert runs["dask_tasks"] == {name.replace("-", "_") for name in COMPUTED}  # what the cluster's workers ran

    accuracy = {row["candidate"]: row["test_accuracy"] for row in default["candidates"]}
    assert accuracy == {row["candidate"]: row["test_accuracy"] for row in on_dask["candidates"]}
    assert set(accuracy) == {"linear_probe", "finetuned"} and min(accuracy.values()) >= 0.5
    assert default["version"] == 1
    # the same champion metrics: the Dask run's challenger ties champion v1 (so nothing is promoted)
    decision = on_dask["decision"]
    assert decision["champion_metrics"]["accuracy"] == decision["challenger_metrics"]["accuracy"]
    assert on_dask["version"] is None and ModelRegistry("pet_runner_a").champion().version == 1


def test_ray_reaches_the_champion_metrics_of_the_default_runner(runs: dict[str, Any], domains: dict[str, Path]) -> None:
    pytest.importorskip("prefect_ray", reason="the `ray` extra is not installed: pip install -e '.[ray]'")
    args = (str(domains["pet_runner_a"]), *_common(runs["model_dir"]), "--task-runner", "ray", "--refresh-cache")
    summary = _json(_run(*args))
    assert summary["task_runner"] == "RayTaskRunner"
    states = task_states(summary["flow_run_id"])
    assert {name: set(states[name]) for name in COMPUTED} == {name: {"Completed"} for name in COMPUTED}, states
    default = runs["default"]
    accuracy = {row["candidate"]: row["test_accuracy"] for row in default["candidates"]}
    assert accuracy == {row["candidate"]: row["test_accuracy"] for row in summary["candidates"]}
    decision = summary["decision"]  # ties champion v1 (trained on the default runner): nothing promoted
    assert decision["champion_metrics"]["accuracy"] == decision["challenger_metrics"]["accuracy"]
    assert summary["version"] is None and ModelRegistry("pet_runner_a").champion().version == 1


def test_two_domains_at_once_each_end_with_one_champion_and_a_consistent_registry(runs: dict[str, Any]) -> None:
    both = runs["both"]
    assert both["errors"] == {} and set(both["summaries"]) == {"pet_runner_a", "pet_runner_b"}
    for name in ("pet_runner_a", "pet_runner_b"):
        registry = ModelRegistry(name)
        assert registry.repair().consistent
        assert [info.version for info in registry.versions()] == [1]
        assert registry.champion().version == 1
    assert both["summaries"]["pet_runner_b"]["version"] == 1
    # the two subflows overlapped in time: they ran at once, not one after the other
    windows = [_window(both["summaries"][name]["flow_run_id"]) for name in ("pet_runner_a", "pet_runner_b")]
    (start_a, end_a), (start_b, end_b) = windows
    assert start_a < end_b and start_b < end_a, windows


def _window(flow_run_id: str) -> tuple[Any, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    return run.start_time, run.end_time


def test_a_domain_that_fails_is_named_and_sets_the_exit_code_while_the_others_finish(
    runs: dict[str, Any], domains: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The default runner (one thread: the domains one after the other), one domain with data that fails
    validation; domain a is all cached by now, so this costs little."""
    bad = copy_domain(tmp_path, "pet_runner_bad", BODY.replace('name = "pet_clinic"', 'name = "pet_runner_bad"'))
    train = bad.parent / "train.csv"
    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[0], *(line for line in lines[1:] if line.endswith(",emergency"))]) + "\n")
    result = _run(str(bad), str(domains["pet_runner_a"]), *_common(tiny_model_dir))
    assert result.exit_code == 3, result.output  # the failed domain's own code: its data failed validation
    assert "pet_runner_bad failed:" in result.output and "1 of 2 domain(s) failed: pet_runner_bad" in result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["task_runner"] == "default (1 thread)" and set(report["errors"]) == {"pet_runner_bad"}
    assert report["summaries"]["pet_runner_a"]["version"] is None  # ran to the end: tied its champion
    assert ModelRegistry("pet_runner_bad").champion() is None and ModelRegistry("pet_runner_a").champion().version == 1


def test_workers_that_do_not_share_the_home_are_refused_before_any_task(
    dask_cluster: Any, domains: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "another-home"))  # this process's home, not the workers'
    with pytest.raises(ClusterSetupError) as refused:
        with start_runner("dask", address=dask_cluster.scheduler_address):
            pass
    message = str(refused.value)
    assert message.count("DOMAINFLOW_HOME is") == 2 and SHARED_HOME_RULE in message  # both workers named
    result = _run(str(domains["pet_runner_a"]), "--dask-address", dask_cluster.scheduler_address)
    assert result.exit_code == 2 and "worker problem(s)" in result.output
    assert not (tmp_path / "another-home" / "registry").exists()


def test_a_task_given_a_path_it_cannot_see_names_the_path_and_the_rule(tmp_path: Path) -> None:
    missing = tmp_path / "not-on-this-worker" / "finetuned-0123"
    parent = ModelRef(name="finetuned", path=str(missing), fingerprint="0123")
    with pytest.raises(SharedPathError) as raised:
        quantize.fn(parent, "pet_runner_a", "onnx_int8")
    assert str(missing) in str(raised.value) and SHARED_HOME_RULE in str(raised.value)
    assert not any(tmp_path.rglob("*onnx*"))  # refused before writing anything
    require_shared(str(tmp_path), [ModelRef(name="x", path=str(tmp_path), fingerprint="0")])  # visible: no error


@pytest.mark.parametrize(
    "args, message",
    [
        (["--all", "pet_clinic"], "not both"),
        ([], "name a DOMAIN"),
        (["customer_service", "finance_sentiment", "--data-dir", "x"], "one domain's data"),
        (["customer_service", "--task-runner", "ray", "--dask-address", "tcp://127.0.0.1:1"], "needs --task-runner"),
        (["customer_service", "--task-runner", "spark"], "unknown task runner"),
    ],
)
def test_run_rejects_conflicting_choices_before_running(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_run_all_trains_the_three_shipped_domains_at_once_and_each_registry_ends_consistent(tmp_path: Path) -> None:
    """`domainflow run --all` in a fresh process and home (so "all" is the three shipped domains, not the ones
    this session registered), three at once (--workers 3), on slices and a one-layer MiniLM. The slices cannot
    meet the shipped floors, so the gates promote nothing: what must hold is that each domain ran to its own
    decision, the three overlapped in time, and every registry is consistent."""
    import os
    import sqlite3
    import subprocess
    import sys

    home, prefect_home = tmp_path / "home", tmp_path / "prefect"
    env = {**os.environ, "DOMAINFLOW_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "results")
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).parent / "domainflow"), "run", "--all", "--workers", "3", "--json"]
    command += ["--num-layers", "1", "--epochs", "1", "--max-train-samples", "800", "--max-test-samples", "200"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    shipped = {"customer_service", "finance_sentiment", "recommendation"}
    assert report["errors"] == {} and set(report["summaries"]) == shipped
    assert report["task_runner"] == "default (3 threads)"
    for name, summary in report["summaries"].items():
        assert summary["decision"]["summary"], name  # the gate decided (and said why)
        assert Path(summary["decision"]["decision_file"]).is_file()
        registry = ModelRegistry(name, root=home / "registry" / name)
        assert registry.repair().consistent, name
        assert registry.champion() is None or registry.champion().version == summary["version"]
    assert "--max-test-samples does not apply to a ranking domain" in done.stderr
    # the three subflows overlapped: read their windows from the run's own Prefect database
    ids = [summary["flow_run_id"] for summary in report["summaries"].values()]
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        rows = db.execute(
            f"SELECT start_time, end_time FROM flow_run WHERE id IN ({', '.join('?' * len(ids))})", ids
        ).fetchall()
    assert len(rows) == 3
    assert max(start for start, _ in rows) < min(end for _, end in rows), rows
