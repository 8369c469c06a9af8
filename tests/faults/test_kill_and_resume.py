"""A real ``domainflow run`` killed with SIGKILL at each stage, then run again.

In the style of SQLite's crash tests: the process is killed for real (no exception, no cleanup,
no atexit), at the moment its own log says a stage has begun. The next run must not redo any step
the killed run had finished (its task runs come back ``Cached``); the last must finish, leave no
half-built folder, and leave a registry that ``repair`` finds consistent, with one promotion.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from domainflow.registry import ModelRegistry
from tests.data_helpers import PET_CLINIC, copy_domain
from tests.process_helpers import clean_env, process_gone, wait_for

FINISHED = re.compile(r"Task run '([a-z\-]+)-[0-9a-f]{3}' - Finished in state (\w+)\(")

#: (stage, a line of the run's own log that says the stage has begun)
STAGES = [
    ("ingest", "ingesting pet_"),
    ("probe", "linear probe: embedding"),
    ("mid-epoch", "step 4/"),
    ("evaluate", "linear_probe: test accuracy"),
    ("compress", "finetuned: test accuracy"),
    ("speed", "texts/s at batch 32"),
    ("after-promotion", "Promote finetuned"),
]


def _command(domain_file: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", str(domain_file), "--model", str(model), "--num-layers", "1"]


def _finished(output: str, state: str) -> Counter[str]:
    return Counter(name for name, seen in FINISHED.findall(output) if seen == state)


def _children(pid: int) -> list[int]:
    """The process's live children (the ephemeral Prefect server among them), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _run_and_kill(command: list[str], env: dict[str, str], marker: str) -> str:
    """Start the run, read its output, SIGKILL it when ``marker`` appears; its output up to then.

    What it started must go with it: the run's ephemeral Prefect server notices its parent is gone and
    stops by itself (before it was tethered, every killed run left a ~230 MB orphan behind)."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen: list[str] = []
    children: list[int] = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            seen.append(line)
            if marker in line:
                children = _children(process.pid)
                os.kill(process.pid, signal.SIGKILL)
                break
        process.wait(timeout=600)
        assert process.returncode == -signal.SIGKILL, f"the run ended before '{marker}':\n{''.join(seen)[-3000:]}"
        assert children, "the run had started no Prefect server"
        wait_for(
            lambda: all(process_gone(child) for child in children), "the killed run's children to stop", timeout=60
        )
    finally:
        try:  # a safety net only: a failed assertion above must not leave them running
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return "".join(seen)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-home")


def _assert_nothing_redone(previous: str, output: str) -> None:
    """Every step the previous (killed) run finished comes back from the cache in this one."""
    cached = _finished(output, "Cached")
    for task, count in _finished(previous, "Completed").items():
        if task in {"report", "deploy"}:  # never cached by design: they write registry state and UI artifacts
            continue
        assert cached[task] >= count, f"{task} finished before the kill but ran again: cached {dict(cached)}"


def test_a_run_killed_at_each_stage_in_turn_resumes_without_redoing_finished_steps(
    home: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """One domain, one home: the run is killed as each stage begins, and each next run is the rerun of
    the one killed before it (it must take what that one finished from the cache before it is killed in
    turn, at a later stage); a last run finishes. Why a chain and not one fresh domain per stage: every
    kill and every rerun is still real, and the steps before a stage are trained once, not seven times."""
    name = "pet_kill_chain"
    body = (PET_CLINIC / "pet_clinic.toml").read_text().replace('name = "pet_clinic"', f'name = "{name}"')
    domain_file = copy_domain(tmp_path, name, body)
    env = clean_env(home)
    command = _command(domain_file, tiny_model_dir)

    previous = ""
    for _stage, marker in STAGES:  # a failure names the marker
        killed = _run_and_kill(command, env, marker)
        _assert_nothing_redone(previous, killed)
        previous = killed

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:] + rerun.stdout[-2000:]
    _assert_nothing_redone(previous, rerun.stdout + rerun.stderr)

    runs = home / "runs" / name
    assert not list(runs.rglob("*.partial")), "a half-built folder survived the reruns"
    registry = ModelRegistry(name, root=home / "registry" / name)
    report = registry.repair()
    assert report.consistent, report.lines()
    events = [event["event"] for event in registry.history()]
    assert events.count("promotion") == 1 and registry.champion() is not None and registry.champion().version == 1
