"""Faults injected into the real file registry: full disks, short writes, torn history lines, and a
process killed between the history intent and the pointer swap.

Each test drives the real registry on real files; only the operating system calls are made to fail
(``os.write`` of one registry file's temp file, ``os.replace`` onto one file) or the process is really
stopped (``os._exit`` in a spawned child). What must hold every time: the champion keeps its version and
bytes, the earlier history is intact, the error names the file, and ``repair`` reports the state clearly.
No models: a "model" is a folder with a few small files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import domainflow.registry as registry_module
from domainflow.registry import ModelRegistry, RegistryError, RegistryWriteError, VersionInfo
from tests.process_helpers import wait_for_exit

DECISION = {"promote": True, "chosen": "finetuned", "summary": "fault test"}
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp$")  # the registry's temp file for <name>


def fake_model(root: Path, name: str, payload: bytes = b"weights") -> Path:
    folder = root / "src" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name}))
    (folder / "model.safetensors").write_bytes(payload * 100)
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry("toy", root=tmp_path / "registry" / "toy")


def promote(registry: ModelRegistry, model: Path) -> VersionInfo:
    return registry.promote(
        model, metrics={"test": {"accuracy": 0.9}}, lineage={"candidate": model.name}, decision=DECISION
    )


def file_state(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(root: Path) -> list[Path]:
    """Temp files or temp version folders: a failed write must take its own away."""
    return [p for p in root.rglob("*") if _TEMP.match(p.name) or p.name.startswith(".tmp-")]


def _fd_target(fd: int) -> str:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).name
    except OSError:
        return ""


def inject(monkeypatch: pytest.MonkeyPatch, target: str, mode: str) -> list[str]:
    """Make the write of the registry file named ``target`` (a regex on the final name) fail.

    ``enospc``: ``os.write`` into its temp file raises ENOSPC; ``short``: ``os.write`` writes half the
    bytes and reports them all (a lying short write); ``replace``: ``os.replace`` onto it raises ENOSPC.
    Returns the names hit, so a test can tell the fault really fired.
    """
    hits: list[str] = []
    pattern = re.compile(target)
    if mode == "replace":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if pattern.fullmatch(Path(dst).name):
                hits.append(Path(dst).name)
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(registry_module.os, "replace", replace)
        return hits
    real_write = os.write

    def write(fd, data):
        temp = _TEMP.match(_fd_target(fd))
        if temp and pattern.fullmatch(temp.group("name")):
            hits.append(temp.group("name"))
            if mode == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            data = bytes(data)
            real_write(fd, data[: len(data) // 2])
            return len(data)
        return real_write(fd, data)

    monkeypatch.setattr(registry_module.os, "write", write)
    return hits


MODES = ["enospc", "short", "replace"]
FINDING = {"enospc": "No space left on device", "short": "short write", "replace": "No space left on device"}


def _established(tmp_path: Path, registry: ModelRegistry) -> None:
    """v1 champion with a decision in the history: the state every fault must leave intact."""
    registry.record_decision(DECISION)
    promote(registry, fake_model(tmp_path, "one"))


def _assert_intact(registry: ModelRegistry, champion: bytes, history: bytes, version: int = 1) -> None:
    assert registry.champion_file.read_bytes() == champion
    assert registry.load_champion().version == version  # exists and its files match its manifest
    assert registry.history_file.read_bytes().startswith(history)
    assert not leftovers(registry.root)
    report = registry.repair()
    assert report.consistent and report.champion_version == version and report.champion_verified, report.lines()
    assert not report.removed_lines and not report.settled


# ---------------------------------------------------------------------------- full disk on every write path


# (file, number the next promotion gets after the fault: the counter moves only once the version is in place)
PROMOTE_PATHS = [
    ("model.safetensors", 2),
    ("config.json", 2),
    ("metrics.json", 2),
    ("lineage.json", 2),
    ("decision.json", 2),
    ("manifest.json", 2),
    ("state.json", 2),
    ("history.jsonl", 3),
    ("champion.json", 3),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "next_number"), PROMOTE_PATHS, ids=[p[0] for p in PROMOTE_PATHS])
def test_a_failed_write_during_promotion_keeps_the_champion_and_the_history(
    tmp_path, registry, monkeypatch, name, next_number, mode
):
    _established(tmp_path, registry)
    champion, history = registry.champion_file.read_bytes(), registry.history_file.read_bytes()
    model = fake_model(tmp_path, "two", b"new")
    hits = inject(monkeypatch, re.escape(name), mode)

    with pytest.raises(RegistryWriteError, match=re.escape(name)) as caught:
        promote(registry, model)
    monkeypatch.undo()

    assert hits, f"the fault on {name} never fired"
    assert FINDING[mode] in str(caught.value) and isinstance(caught.value, OSError)
    assert caught.value.path is not None and caught.value.path.name == name
    assert [v.version for v in registry.versions()] == [1]
    _assert_intact(registry, champion, history)
    events = registry.history()
    if name == "champion.json":  # the intent was written: the history says what happened
        assert [(e["event"], e.get("version")) for e in events[-2:]] == [("promotion", 2), ("promotion_aborted", 2)]
        assert "champion.json still v1" in events[-1]["reason"]
    else:
        assert registry.history_file.read_bytes() == history
    assert registry.next_version() == next_number
    assert promote(registry, model).version == next_number  # and the registry works again


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["history.jsonl", "champion.json"])
def test_a_failed_write_during_rollback_keeps_the_champion(tmp_path, registry, monkeypatch, name, mode):
    _established(tmp_path, registry)
    promote(registry, fake_model(tmp_path, "two", b"two"))
    champion, history = registry.champion_file.read_bytes(), registry.history_file.read_bytes()
    hits = inject(monkeypatch, re.escape(name), mode)

    with pytest.raises(RegistryError, match=re.escape(name)):
        registry.rollback(reason="fault test")
    monkeypatch.undo()

    assert hits
    _assert_intact(registry, champion, history, version=2)
    assert [e["event"] for e in registry.history()][-1] == (
        "rollback_aborted" if name == "champion.json" else "promotion"
    )
    assert registry.rollback().version == 1  # undo still walks back past the aborted attempt
    assert registry.champion().version == 1


@pytest.mark.parametrize("mode", ["enospc", "short"])
@pytest.mark.parametrize("name", [r".*-finetuned\.json", r"history\.jsonl"], ids=["decision-file", "history"])
def test_a_failed_write_of_a_decision_leaves_neither_file_nor_line(tmp_path, registry, monkeypatch, name, mode):
    _established(tmp_path, registry)
    before = file_state(registry.root)
    hits = inject(monkeypatch, name, mode)

    with pytest.raises(RegistryWriteError, match=FINDING[mode]):
        registry.record_decision({"promote": False, "chosen": "finetuned", "summary": "disk full"})
    monkeypatch.undo()

    assert hits
    assert file_state(registry.root) == before  # both or neither: no decision file without its history line
    assert not leftovers(registry.root)


def test_a_full_disk_during_repair_keeps_the_history_it_could_not_rewrite(tmp_path, registry, monkeypatch):
    _established(tmp_path, registry)
    with open(registry.history_file, "ab") as handle:
        handle.write(b'{"event": "promot')
    history = registry.history_file.read_bytes()
    inject(monkeypatch, r"history\.jsonl\.bak-.*", "enospc")

    with pytest.raises(RegistryWriteError, match=r"history\.jsonl\.bak-"):
        registry.repair()
    monkeypatch.undo()

    assert registry.history_file.read_bytes() == history
    assert not leftovers(registry.root)
    assert registry.repair().removed_lines  # with space again it goes through


# ---------------------------------------------------------------------------- a tolerant history and its repair


def test_torn_and_corrupt_history_lines_are_skipped_rollback_works_and_repair_removes_them(tmp_path, registry, caplog):
    for name in ("one", "two", "three"):
        promote(registry, fake_model(tmp_path, name))
    lines = registry.history_file.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    registry.history_file.write_bytes(
        lines[0] + b"{not json\n" + lines[1] + b"\xff\xfe binary\n" + b"[1, 2]\n" + lines[2] + b'{"event": "promo'
    )

    with caplog.at_level(logging.WARNING, logger="domainflow.registry"):
        events = registry.history()
    assert [e["version"] for e in events] == [1, 2, 3]
    for number in (2, 4, 5, 7):
        assert f"history.jsonl line {number} skipped" in caplog.text
    assert "torn last line" in caplog.text and "registry repair toy" in caplog.text

    assert registry.rollback(reason="v3 misbehaves").version == 2  # undo reads the history through the bad lines
    damaged = registry.history_file.read_bytes()

    report = registry.repair()
    assert [number for number, _ in report.removed_lines] == [2, 4, 5, 7]
    assert report.backup is not None and report.backup.name.startswith("history.jsonl.bak-")
    assert report.backup.read_bytes() == damaged  # nothing is lost: the original is kept
    assert report.consistent and report.champion_version == 2 and report.champion_verified
    text = "\n".join(report.lines())
    assert "removed 4 unreadable line(s)" in text and "line 7: not JSON" in text
    assert "consistent: champion.json points at v2" in text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="domainflow.registry"):
        events = registry.history()
    assert not caplog.text
    assert [e["event"] for e in events] == ["promotion", "promotion", "promotion", "rollback", "repair"]
    assert events[-1]["removed_lines"] == [2, 4, 5, 7] and events[-1]["backup"] == report.backup.name
    assert all(json.loads(line) for line in registry.history_file.read_text().splitlines())
    assert registry.rollback().version == 1
    assert registry.repair().removed_lines == []  # idempotent


def test_repair_of_a_sound_registry_changes_nothing(tmp_path, registry):
    assert registry.repair().lines()[-1] == "consistent: no champion yet"  # no registry folder at all
    assert not registry.root.exists()
    _established(tmp_path, registry)
    before = file_state(registry.root)
    report = registry.repair()
    assert report.consistent and report.champion_verified and not report.notes
    assert file_state(registry.root) == before


def test_repair_reports_a_champion_that_fails_verification(tmp_path, registry):
    info = promote(registry, fake_model(tmp_path, "one"))
    (info.model_dir / "model.safetensors").write_bytes(b"bitrot" * 100)
    report = registry.repair()
    assert not report.consistent and report.champion_version == 1
    assert f"{info.model_dir / 'model.safetensors'} changed" in str(report.problem)
    assert report.lines()[-1].startswith("NOT CONSISTENT")

    registry.champion_file.write_text("{torn")
    report = registry.repair()
    assert not report.consistent and "corrupt" in str(report.problem)
    assert "the history's last champion is v1" in str(report.problem)


# ---------------------------------------------------------------------------- stopped between intent and pointer swap


def test_a_failed_pointer_swap_leaves_an_explained_history_that_repair_reports(tmp_path, registry, monkeypatch):
    _established(tmp_path, registry)
    champion = registry.champion_file.read_bytes()
    inject(monkeypatch, r"champion\.json", "replace")
    with pytest.raises(RegistryError, match="champion.json"):
        promote(registry, fake_model(tmp_path, "two"))
    monkeypatch.undo()

    assert registry.champion_file.read_bytes() == champion
    report = registry.repair()
    assert report.consistent and report.champion_version == 1 and report.champion_verified
    assert not report.settled  # the failing process recorded the abort itself
    assert any("the last change of champion was aborted" in note and "v2 removed" in note for note in report.notes)
    events = registry.history()
    assert [e["event"] for e in events] == ["decision", "promotion", "promotion", "promotion_aborted"]


def _stop_at_the_pointer_swap(root: str, source: str, action: str) -> None:
    """In a child process: promote (or roll back) and die, as kill -9 would, when champion.json is replaced."""
    real_replace = os.replace

    def die_on_champion(src, dst, *args, **kwargs):
        if Path(dst).name == "champion.json":
            os._exit(9)
        return real_replace(src, dst, *args, **kwargs)

    registry_module.os.replace = die_on_champion  # type: ignore[assignment]  # this process ends here
    registry = ModelRegistry("toy", root=Path(root))
    if action == "promote":
        promote(registry, Path(source))
    else:
        registry.rollback(reason="stopped midway")


def _run_and_die(registry: ModelRegistry, source: Path | None, action: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads or patches
    child = ctx.Process(target=_stop_at_the_pointer_swap, args=(str(registry.root), str(source), action))
    child.start()
    assert wait_for_exit(child, "the child to stop at the pointer swap") == 9, (
        "the child did not stop at the pointer swap"
    )


def test_a_process_killed_between_the_intent_and_the_pointer_swap(tmp_path, registry):
    _established(tmp_path, registry)
    champion = registry.champion_file.read_bytes()
    history = registry.history_file.read_bytes()

    _run_and_die(registry, fake_model(tmp_path, "two", b"two"), "promote")

    # As the crash left it: the intent names v2, the pointer still names v1, and readers are fine.
    assert registry.champion_file.read_bytes() == champion
    assert registry.load_champion().version == 1
    events = registry.history()
    assert registry.history_file.read_bytes().startswith(history)
    assert (events[-1]["event"], events[-1]["version"]) == ("promotion", 2)
    assert [p.name for p in registry.root.glob(".champion.json.*.tmp")]  # the temp file the crash left

    report = registry.repair()
    assert report.consistent and report.champion_version == 1 and report.champion_verified
    assert [p.name for p in report.removed_leftovers if p.name.startswith(".champion.json.")]
    [settled] = report.settled
    assert "the promotion of v2" in settled and "never took effect" in settled and "still points at v1" in settled
    assert report.next_version == 3
    text = "\n".join(report.lines())
    assert "settled: the promotion of v2" in text and "consistent: champion.json points at v1" in text
    assert (registry.history()[-1]["event"], registry.history()[-1]["version"]) == ("promotion_aborted", 2)
    assert not leftovers(registry.root)

    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()  # v2 was never a champion: there is nothing to undo to
    assert promote(registry, fake_model(tmp_path, "three")).version == 3
    assert registry.rollback().version == 1


def test_the_next_promotion_settles_an_interrupted_one_by_itself(tmp_path, registry):
    _established(tmp_path, registry)
    _run_and_die(registry, fake_model(tmp_path, "two", b"two"), "promote")

    assert promote(registry, fake_model(tmp_path, "three")).version == 3  # 2 is burnt
    events = [(e["event"], e.get("version")) for e in registry.history()]
    assert events[-3:] == [("promotion", 2), ("promotion_aborted", 2), ("promotion", 3)]
    assert registry.rollback().version == 1
    assert registry.repair().settled == []


def test_a_rollback_killed_before_its_pointer_swap(tmp_path, registry):
    _established(tmp_path, registry)
    promote(registry, fake_model(tmp_path, "two", b"two"))
    _run_and_die(registry, None, "rollback")

    assert registry.champion().version == 2
    report = registry.repair()
    [settled] = report.settled
    assert "the rollback from v2 to v1" in settled and report.consistent and report.champion_version == 2
    assert registry.history()[-1]["event"] == "rollback_aborted"
    assert registry.rollback().version == 1  # undo still works after the aborted attempt


# ---------------------------------------------------------------------------- the CLI


def test_registry_repair_from_the_cli(tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    registry = ModelRegistry("customer_service")
    info = promote(registry, fake_model(tmp_path, "one"))
    with open(registry.history_file, "ab") as handle:
        handle.write(b"{torn\n")
    runner = CliRunner()

    repaired = runner.invoke(app, ["registry", "repair", "customer_service"])
    assert repaired.exit_code == 0, repaired.output
    assert "removed 1 unreadable line(s)" in repaired.output and "line 2: not JSON" in repaired.output
    assert "consistent: champion.json points at v1 (files match its manifest)" in repaired.output

    (info.model_dir / "tokenizer.json").unlink()
    broken = runner.invoke(app, ["registry", "repair", "customer_service"])
    assert broken.exit_code == 2, broken.output
    assert "NOT CONSISTENT" in broken.output and "tokenizer.json is missing" in broken.output
