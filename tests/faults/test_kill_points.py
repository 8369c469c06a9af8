"""A real ``domainflow run`` killed with SIGKILL at a precise point *inside* a step, then run again.

``test_kill_and_resume.py`` kills a run from outside when its log says a stage has begun. The points
here have no log line of their own (halfway through the Trainer's checkpoint save, after the second
file of a registry copy, between the history's promotion record and the champion pointer swap), so
the run kills itself: ``tests/faults/killer.py`` wraps one function in the child process and calls
``os.kill(os.getpid(), SIGKILL)`` there, then runs the CLI as a user would. No test hook is in the
product code. Each test checks first that the fault fired where it was meant to (exit -SIGKILL, the
killer's own line, the leftover it must have left), then what the next run does with it.

Also here: another process promoting between the gate's read of the champion and this run's
promotion (a race, not a kill), and a champion damaged on disk before a run.

Timing comes from events only: the killed process's exit, a subprocess's exit. Each test takes one
or two real runs of the small pet clinic domain with a one-layer MiniLM (~15 s when every step is
cached, ~60 s when nothing is); the tests share one home, each with its own domain name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from domainflow.registry import ModelRegistry, RegistryError
from flows.console import EXIT_REGISTRY
from tests.data_helpers import PET_CLINIC, copy_domain
from tests.process_helpers import clean_env

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FINISHED = re.compile(r"Task run '([a-z\-]+)-[0-9a-f]{3}' - Finished in state (\w+)\(")
NEVER_CACHED = {"report", "deploy"}  # they write registry state and UI artifacts: they run every time


@dataclass(frozen=True)
class Run:
    returncode: int
    output: str  # stdout and stderr, interleaved as written

    def tail(self) -> str:
        return self.output[-5000:]


def _domain_file(tmp_path: Path, name: str) -> Path:
    body = (PET_CLINIC / "pet_clinic.toml").read_text().replace('name = "pet_clinic"', f'name = "{name}"')
    return copy_domain(tmp_path, name, body)


def _run_args(domain_file: Path, model: Path) -> list[str]:
    return ["run", str(domain_file), "--model", str(model), "--num-layers", "1"]


def _cli(home: Path, args: list[str]) -> Run:
    """``domainflow ARGS`` as a user types it (``python -m flows.cli`` is the ``domainflow`` script)."""
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=PROJECT_ROOT,
        env=clean_env(home, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,  # turns a hang into a failure; nothing waits on it
    )
    return Run(done.returncode, done.stdout)


def _rigged(home: Path, rig: list[str], args: list[str]) -> Run:
    """``domainflow ARGS`` under tests/faults/killer.py with ``rig`` (where to kill it, or what to race)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.killer", *rig, "--", *args],
        cwd=PROJECT_ROOT,
        env=clean_env(home, PYTHONUNBUFFERED="1"),  # every line the run printed before it died reaches us
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    chunks: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: chunks.extend(process.stdout or ()), daemon=True)
    reader.start()  # drain the pipe while waiting, so a chatty run never blocks on a full pipe
    try:
        process.wait(timeout=900)  # turns a hang into a failure; the run's own exit is the event waited for
    finally:  # a killed run's temporary Prefect server (it holds our pipe) would stop itself soon; don't wait
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reader.join(timeout=60)
    output = "".join(chunks)
    return Run(process.returncode, output)


def _assert_killed(run: Run, where: str) -> None:
    """The run died of SIGKILL, at the point the killer announced, not of anything else or elsewhere."""
    assert run.returncode == -signal.SIGKILL, f"the run was not killed (exit {run.returncode}):\n{run.tail()}"
    kills = re.findall(r"killer: SIGKILL (.*)", run.output)
    assert len(kills) == 1 and kills[0].startswith(where), f"killed elsewhere: {kills}\n{run.tail()}"


def _finished(output: str, state: str) -> Counter[str]:
    return Counter(name for name, seen in FINISHED.findall(output) if seen == state)


def _assert_resumed(killed: Run, rerun: Run, home: Path, name: str) -> ModelRegistry:
    """What every resumed run must show: exit 0, no finished step redone, no half-built folder, a sound registry."""
    assert rerun.returncode == 0, rerun.tail()
    cached = _finished(rerun.output, "Cached")
    for task, count in _finished(killed.output, "Completed").items():
        if task not in NEVER_CACHED:
            assert cached[task] >= count, f"{task} finished before the kill but ran again: cached {dict(cached)}"
    assert not list((home / "runs" / name).rglob("*.partial")), "a half-built folder survived the rerun"
    registry = ModelRegistry(name, root=home / "registry" / name)
    assert not list(registry.versions_dir.glob(".tmp-*")), "a half-copied version survived the rerun"
    report = registry.repair()
    assert report.consistent and not report.settled and not report.removed_leftovers, report.lines()
    return registry


def _events(registry: ModelRegistry) -> list[str]:
    return [event["event"] for event in registry.history()]


def _version_folders(registry: ModelRegistry) -> list[str]:
    return sorted(p.name for p in registry.versions_dir.iterdir()) if registry.versions_dir.is_dir() else []


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _one_line(text: str) -> str:
    """Console output with Rich's line wrapping undone, for matching a message that may span lines."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kill-points-home")


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_a_run_killed_inside_a_checkpoint_save_drops_the_torn_checkpoint_and_resumes_from_the_last_whole_one(
    home: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The Trainer saves a checkpoint per epoch (``save_strategy="epoch"``; the domain trains 2 epochs of
    4 steps): weights first, then optimizer and scheduler, RNG state, and ``trainer_state.json`` last.
    The run is killed as the second save starts on the optimizer, so ``checkpoint-4`` is whole and
    ``checkpoint-8`` holds weights without a trainer state. Resuming from it would fail every later run."""
    name = "pet_kp_checkpoint"
    args = _run_args(_domain_file(tmp_path, name), tiny_model_dir)
    target = "transformers.trainer:Trainer._save_optimizer_and_scheduler"

    killed = _rigged(home, ["--kill-in", target, "--skip", "1"], args)

    _assert_killed(killed, f"at the start of call 2 of {target}")
    [checkpoints] = (home / "runs" / name / "models").glob("finetuned-*.checkpoints")
    whole, torn = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    assert (whole / "trainer_state.json").is_file() and (whole / "optimizer.pt").is_file()
    assert (torn / "model.safetensors").is_file() and not (torn / "trainer_state.json").exists()
    assert not (torn / "optimizer.pt").exists()

    rerun = _cli(home, args)

    registry = _assert_resumed(killed, rerun, home, name)
    assert f"removing torn checkpoint {torn} (no complete trainer_state.json): a crash cut it short" in rerun.output
    assert f"resuming fine-tuning from {whole}" in rerun.output
    assert _finished(rerun.output, "Completed")["finetune"] == 1
    assert not checkpoints.exists(), "checkpoints are removed once the model is saved"
    assert _events(registry) == ["decision", "promotion"]
    champion = registry.load_champion()
    assert champion is not None and champion.version == 1


# ---------------------------------------------------------------------------------------------- promotion


def test_a_run_killed_while_copying_its_model_into_the_registry_leaves_a_temp_folder_the_rerun_removes(
    home: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A version is assembled in ``versions/.tmp-<uuid>`` and renamed into place whole. Killed after the
    second file of the copy, nothing but that folder (and the gate's decision) exists; no number is spent."""
    name = "pet_kp_copy"
    args = _run_args(_domain_file(tmp_path, name), tiny_model_dir)
    target = "domainflow.registry:_copy_file"
    rig = ["--kill-in", target, "--after", "2", "--when-arg-matches", r"/versions/\.tmp-[0-9a-f]{32}/"]

    killed = _rigged(home, rig, args)

    _assert_killed(killed, f"after call 2 of {target} returned")
    registry = ModelRegistry(name, root=home / "registry" / name)
    [leftover] = registry.versions_dir.glob(".tmp-*")
    copied = [p.relative_to(leftover) for p in leftover.rglob("*") if p.is_file()]
    assert len(copied) == 2 and all(p.parts[0] == "model" for p in copied), copied
    assert _version_folders(registry) == [leftover.name]
    assert not registry.champion_file.exists() and not registry.state_file.exists()
    assert _events(registry) == ["decision"]

    rerun = _cli(home, args)

    registry = _assert_resumed(killed, rerun, home, name)
    assert not leftover.exists()
    assert re.search(rf"{name}: promoted \S+ as v1 ", rerun.output), rerun.tail()
    assert _version_folders(registry) == ["0001"]
    assert _events(registry) == ["decision", "decision", "promotion"]
    champion = registry.load_champion()  # its files checked against its manifest
    assert champion is not None and champion.version == 1


def test_a_run_killed_between_the_promotion_record_and_the_pointer_swap_is_settled_by_the_next_promotion(
    home: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Killed as champion.json is about to be replaced: v1's folder, the counter and the history's
    ``promotion`` record (the intent) are written, the pointer is not. The rerun's gate sees no champion
    and promotes again; the registry first records v1's promotion as aborted (it never took effect), so
    the new model is v2 (numbers are never reused) and the history replays to one champion: v2."""
    name = "pet_kp_swap"
    args = _run_args(_domain_file(tmp_path, name), tiny_model_dir)
    target = "domainflow.registry:_write_json_atomic"

    killed = _rigged(home, ["--kill-in", target, "--when-arg-matches", r"(^|/)champion\.json$"], args)

    _assert_killed(killed, f"at the start of call 1 of {target}")
    registry = ModelRegistry(name, root=home / "registry" / name)
    assert not registry.champion_file.exists()
    assert registry.get(1, verify=True).version == 1  # renamed into place whole, never served
    assert json.loads(registry.state_file.read_text()) == {"next_version": 2}
    intent = registry.history()[-1]
    assert _events(registry) == ["decision", "promotion"] and intent["version"] == 1

    rerun = _cli(home, args)

    registry = _assert_resumed(killed, rerun, home, name)
    said = f"{name}: the promotion of v1 recorded at {intent['at']} never took effect"  # a warning in the run's log
    assert said in rerun.output, rerun.tail()
    assert re.search(rf"{name}: promoted \S+ as v2 ", rerun.output), rerun.tail()
    history = registry.history()
    assert _events(registry) == ["decision", "promotion", "promotion_aborted", "decision", "promotion"]
    # Two promotion records by design: v1's intent stays in the history, cancelled by the abort record after it.
    assert [e["version"] for e in history if e["event"] == "promotion"] == [1, 2]
    aborted = history[2]
    assert aborted["version"] == 1
    assert f"the promotion of v1 recorded at {intent['at']} never took effect" in aborted["reason"]
    assert (
        "still points at no version" in aborted["reason"] and "stays on disk but was never served" in aborted["reason"]
    )
    assert _version_folders(registry) == ["0001", "0002"]
    champion = registry.load_champion()
    assert champion is not None and champion.version == 2 and champion.lineage["previous_champion"] is None
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()  # v1 was never a champion: the history holds exactly one
    assert registry.repair().next_version == 3


# ---------------------------------------------------------------------------------------------- a race

#: Another process's promotion, made while the run is inside ``ModelRegistry.promote``'s caller, after its
#: gate read the champion. Its candidate is the run's own folder (the first positional argument after self).
RACER = """\
import json, os, sys
from pathlib import Path
from domainflow.registry import ModelRegistry
candidate = Path(json.loads(os.environ["KILLER_CALL_ARGS"])["args"][1])
info = ModelRegistry(sys.argv[1]).promote(
    candidate,
    metrics={"test": {"accuracy": 1.0}},
    lineage={"candidate": "concurrent-run"},
    decision={"promote": True, "chosen": "concurrent-run", "summary": "promoted by another process (fault test)"},
)
print(f"racer: promoted v{info.version}", flush=True)
"""


def test_a_promotion_racing_the_run_after_its_gate_read_the_champion_refuses_the_runs_promotion(
    home: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The gate compared the candidate with "no champion"; just before the run's ``promote``, another
    process promotes (a concurrent promote rather than a rollback: a rollback needs two earlier
    champions, i.e. two more full runs, and takes the same ``expected_champion`` check). The run must not
    replace a champion its gate never saw: it fails naming the reason, and the other process's champion stays."""
    name = "pet_kp_race"
    args = _run_args(_domain_file(tmp_path, name), tiny_model_dir)
    race = shlex.join([sys.executable, "-c", RACER, name])

    raced = _rigged(home, ["--race-in", "domainflow.registry:ModelRegistry.promote", "--race-command", race], args)

    assert "killer: race before call 1 of domainflow.registry:ModelRegistry.promote" in raced.output, raced.tail()
    assert "racer: promoted v1" in raced.output and "killer: race exited 0" in raced.output, raced.tail()
    # The registry's own exit code (5) and its message, no traceback.
    assert raced.returncode == EXIT_REGISTRY, raced.tail()
    message = "champion is v1, not vNone as the gate assumed; another run promoted meanwhile: re-run the gate"
    assert f"registry: {name}: {message}" in _one_line(raced.output), raced.tail()
    assert "Finished in state Failed" in raced.output and f"{name}: promoted" not in raced.output

    registry = ModelRegistry(name, root=home / "registry" / name)
    history = registry.history()
    assert _events(registry) == ["decision", "promotion"]  # this run's decision, the other process's promotion
    assert history[0]["promote"] is True and history[0]["candidate"] != "concurrent-run"
    assert history[1]["candidate"] == "concurrent-run" and history[1]["version"] == 1
    assert _version_folders(registry) == ["0001"]  # nothing copied for the refused promotion
    champion = registry.load_champion()
    assert champion is not None and champion.version == 1 and champion.lineage["candidate"] == "concurrent-run"
    report = registry.repair()
    assert report.consistent and not report.settled and not report.removed_leftovers, report.lines()
    assert report.next_version == 2


# ---------------------------------------------------------------------------------------------- a damaged champion


def test_a_damaged_champion_is_never_served_and_a_run_loses_nothing(
    home: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """After a clean run promoted v1: (a) champion.json holds garbage; (b) one byte of v1's model file is
    flipped. What each does to the next run, to ``domainflow predict`` and to ``registry repair``."""
    name = "pet_kp_damaged"
    domain_file = _domain_file(tmp_path, name)
    args = _run_args(domain_file, tiny_model_dir)
    predict = ["predict", str(domain_file), "my dog ate chocolate"]
    first = _cli(home, args)
    assert first.returncode == 0, first.tail()
    registry = ModelRegistry(name, root=home / "registry" / name)
    champion = registry.load_champion()
    assert champion is not None and champion.version == 1
    pointer = registry.champion_file.read_bytes()
    before = _snapshot(registry.root)

    # (a) A pointer that is not JSON. The run reads the champion right after ingest (to check the labels)
    # and fails there naming the file: no step after it runs, and no registry file is written or "fixed".
    garbage = b"\x00garbage, not a champion {\n"
    registry.champion_file.write_bytes(garbage)
    broken = _cli(home, args)
    assert broken.returncode == EXIT_REGISTRY, broken.tail()
    assert f"registry: corrupt registry file {registry.champion_file}" in _one_line(broken.output), broken.tail()
    assert "Finished in state Failed" in broken.output and "Task run 'deploy-" not in broken.output
    assert _snapshot(registry.root) == {**before, "champion.json": hashlib.sha256(garbage).hexdigest()}
    refused = _cli(home, predict)
    assert refused.returncode == 2 and f"corrupt registry file {registry.champion_file}" in _one_line(refused.output)
    report = registry.repair()
    assert not report.consistent and "the history's last champion is v1" in str(report.problem), report.lines()
    registry.champion_file.write_bytes(pointer)
    assert registry.repair().consistent and _snapshot(registry.root) == before

    # (b) One flipped byte in the champion's model file. The gate checks the champion's files against its
    # manifest: v1 is not the model its metrics describe and nothing can load it, so the run says so and judges
    # the challenger on the floors alone; promoting v2 is the repair. v1 stays on disk, as it was.
    weights = max((p for p in champion.model_dir.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    original = weights.read_bytes()
    middle = len(original) // 2
    weights.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1 :])
    refused = _cli(home, predict)
    assert refused.returncode == 2, refused.tail()
    assert f"{name} v1 failed verification" in _one_line(refused.output) and f"{weights} changed: sha256" in _one_line(
        refused.output
    )
    history = registry.history_file.read_bytes()
    replaced = _cli(home, args)
    assert replaced.returncode == 0, replaced.tail()
    assert "Champion v1 fails verification" in _one_line(replaced.output), replaced.tail()
    assert f"{weights} changed" in _one_line(replaced.output), replaced.tail()
    assert registry.history_file.read_bytes().startswith(history) and _events(registry)[-2:] == [
        "decision",
        "promotion",
    ]
    decision = json.loads((registry.root / registry.history()[-2]["decision_file"]).read_text())
    assert decision["champion_damage"].startswith(f"{name} v1 failed verification"), decision
    assert registry.history()[-2]["summary"].startswith("Champion v1 fails verification")
    assert _version_folders(registry) == ["0001", "0002"]
    assert weights.read_bytes() != original  # the damaged version is kept as evidence, not "fixed"
    champion = registry.load_champion()
    assert champion is not None and champion.version == 2 and champion.lineage["previous_champion"] == 1
    assert _cli(home, predict).returncode == 0
    assert registry.repair().consistent
