"""What a kill -9 leaves behind never blocks the next run: torn checkpoints and half-built folders."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from domainflow.atomic import build_atomically, clean_stale_partials
from tasks.finetune import last_complete_checkpoint


def _checkpoint(folder: Path, step: int, state: str | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_a_torn_checkpoint_is_removed_and_the_previous_one_resumed(tmp_path: Path) -> None:
    log = logging.getLogger("test")
    good = _checkpoint(tmp_path, 40, json.dumps({"global_step": 40}))
    _checkpoint(tmp_path, 80, '{"global_step": 8')  # killed while writing the state file
    _checkpoint(tmp_path, 120, None)  # killed before it
    assert last_complete_checkpoint(tmp_path, log) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-40"]  # numeric order: 120 > 80 > 40


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert last_complete_checkpoint(tmp_path / "absent", logging.getLogger("test")) is None
    _checkpoint(tmp_path, 5, "not json")
    assert last_complete_checkpoint(tmp_path, logging.getLogger("test")) is None and not any(tmp_path.iterdir())


def test_partials_of_dead_processes_are_cleaned_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    (tmp_path / "models" / f".finetuned-abc.{dead_pid}-0a1b2c3d.partial").mkdir(parents=True)

    def build(folder: Path) -> list[Path]:
        (folder / "weights").write_bytes(b"x")
        return clean_stale_partials(tmp_path)  # our own folder, mid-build, belongs to a live process

    removed = build_atomically(tmp_path / "models" / "finetuned-def", build)
    assert [p.name for p in removed] == [f".finetuned-abc.{dead_pid}-0a1b2c3d.partial"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["finetuned-def"]
