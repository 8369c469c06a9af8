"""Promotion copies the bytes the gate judged, or nothing: ``promote(expected_fingerprint=...)``.

A candidate folder is named by its inputs, so another run (or another code version) can rewrite it
between evaluation and promotion. The registry re-fingerprints the folder before copying and the
copy before it becomes visible; a mismatch refuses the promotion and leaves the registry as it was.
No models: a "model" is a folder with a few small files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import domainflow.registry as registry_module
from domainflow.fingerprint import path_fingerprint
from domainflow.registry import ModelRegistry, RegistryError, VersionInfo

DECISION = {"promote": True, "chosen": "finetuned", "summary": "integrity test"}


def fake_model(root: Path, name: str, payload: bytes = b"weights") -> Path:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name}))
    (folder / "model.safetensors").write_bytes(payload * 100)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "vocab.txt").write_text("a\nb\n")
    return folder


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path / "home"))
    return ModelRegistry("toy")  # under <DOMAINFLOW_HOME>/registry/toy, as the pipeline uses it


def promote(registry: ModelRegistry, model: Path, fingerprint: str | None, **kwargs) -> VersionInfo:
    return registry.promote(
        model,
        metrics={"test": {"accuracy": 0.9}},
        lineage={"candidate": model.name, "model_fingerprint": fingerprint},
        decision=DECISION,
        expected_fingerprint=fingerprint,
        **kwargs,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for folders) under root."""
    return {
        str(p.relative_to(root)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def test_the_fingerprint_of_a_folder_does_not_depend_on_where_it_is(tmp_path):
    """Candidates are fingerprinted in ``<target>.partial`` and then renamed: the name must not count."""
    model = fake_model(tmp_path, "finetuned-abc.partial")
    before = path_fingerprint(model)
    moved = model.rename(model.parent / "finetuned-abc")
    assert path_fingerprint(moved) == before


def test_promotion_with_the_evaluated_fingerprint_stores_those_bytes(tmp_path, registry):
    model = fake_model(tmp_path, "finetuned")
    fingerprint = path_fingerprint(model)
    index = tmp_path / "index.npy"
    index.write_bytes(b"retrieval index")

    info = promote(registry, model, fingerprint, model_extras=[index])

    assert info.version == 1 and registry.champion().version == 1
    assert info.lineage["verified_fingerprint"] == fingerprint
    assert (info.model_dir / "index.npy").read_bytes() == b"retrieval index"  # extras still join the copy
    (info.model_dir / "index.npy").unlink()
    assert path_fingerprint(info.model_dir) == fingerprint  # the version holds exactly the evaluated bytes


def _modify(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"retrained by another run" * 100)


def _add(model: Path) -> None:
    (model / "extra_weights.bin").write_bytes(b"new")


def _remove(model: Path) -> None:
    (model / "sub" / "vocab.txt").unlink()


def _rename(model: Path) -> None:
    (model / "tokenizer.json").rename(model / "tokenizer.old.json")


@pytest.mark.parametrize("change", [_modify, _add, _remove, _rename], ids=["modified", "added", "removed", "renamed"])
def test_a_candidate_changed_after_evaluation_is_not_promoted(tmp_path, registry, change: Callable[[Path], None]):
    champion = promote(registry, fake_model(tmp_path, "champion", b"old"), None)
    model = fake_model(tmp_path, "finetuned")
    evaluated = path_fingerprint(model)
    change(model)
    now = path_fingerprint(model)
    before = snapshot(registry.root)
    history = registry.history_file.read_bytes()

    with pytest.raises(RegistryError) as caught:
        promote(registry, model, evaluated)

    message = str(caught.value)
    assert f"candidate folder {model} changed after evaluation" in message
    assert f"fingerprint {now}, expected {evaluated}" in message and "nothing was promoted" in message
    assert registry.champion().version == champion.version
    assert [v.version for v in registry.versions()] == [champion.version]
    assert registry.history_file.read_bytes() == history
    assert snapshot(registry.root) == before  # no partial version folder, no decision, no pointer change
    assert not list(registry.versions_dir.glob(".tmp-*"))


def test_a_candidate_changed_while_it_is_copied_is_not_promoted(tmp_path, registry, monkeypatch):
    """The check before the copy passes; a writer changes a file before it is copied; the copy's check catches it."""
    champion = promote(registry, fake_model(tmp_path, "champion", b"old"), None)
    model = fake_model(tmp_path, "finetuned")
    evaluated = path_fingerprint(model)
    before = snapshot(registry.root)
    real_copy = registry_module._copy_file
    changed = []

    def copy_while_another_run_writes(src: str, dst: str) -> str:
        if not changed and Path(src).parent == model:
            _modify(model)  # another run rewrites the weights mid-copy
            changed.append(src)
        return real_copy(src, dst)

    monkeypatch.setattr(registry_module, "_copy_file", copy_while_another_run_writes)
    with pytest.raises(RegistryError, match=r"changed after evaluation \(found while copying it into .*versions\)"):
        promote(registry, model, evaluated)
    monkeypatch.undo()

    assert changed
    assert registry.champion().version == champion.version
    assert snapshot(registry.root) == before
    assert not list(registry.versions_dir.glob(".tmp-*"))
    # re-evaluated (new fingerprint), the same folder promotes, and takes the next number: none was burnt
    assert promote(registry, model, path_fingerprint(model)).version == champion.version + 1


def test_without_an_expected_fingerprint_nothing_is_checked(tmp_path, registry):
    """Callers that do not pass one (older code, tests) keep today's behaviour."""
    model = fake_model(tmp_path, "finetuned")
    _modify(model)
    info = promote(registry, model, None)
    assert info.version == 1 and "verified_fingerprint" not in info.lineage
    assert os.path.isfile(info.model_dir / "model.safetensors")
