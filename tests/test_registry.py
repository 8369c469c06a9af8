"""The file registry (atomic promotion, rollback, locking) and the deploy orchestration around it.

No models: a "model" is a folder with a few small files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import pytest

import domainflow.registry as registry_module
from domainflow.fingerprint import path_fingerprint
from domainflow.records import Evaluation, ModelRef
from domainflow.registry import ModelRegistry, RegistryError, VersionInfo, verify_version
from domainflow.spec import ClassificationSpec as DomainSpec
from domainflow.spec import DataSource, QualityGates
from tasks.deploy import apply_decision, artifact_key, candidate_rows, champion_metrics_for, decision_markdown
from tests.process_helpers import wait_for_exit

DECISION = {"promote": True, "chosen": "finetuned", "summary": "test promotion"}


def fake_model(root: Path, name: str = "model", payload: bytes = b"weights") -> Path:
    folder = root / "src" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name}))
    (folder / "model.safetensors").write_bytes(payload * 100)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "domainflow.json").write_text(json.dumps({"labels": ["a", "b"]}))
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry("toy", root=tmp_path / "registry" / "toy")


def promote(registry: ModelRegistry, model: Path, accuracy: float = 0.9, **kwargs) -> VersionInfo:
    return registry.promote(
        model,
        metrics={"test": {"accuracy": accuracy}},
        lineage={"candidate": model.name, "test_fingerprint": "t1"},
        decision=DECISION,
        **kwargs,
    )


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for folders) under root."""
    result = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.split(os.sep)[0] in skip:
            continue
        result[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return result


# ---------------------------------------------------------------------------- promote / read


def test_default_root_comes_from_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path))
    assert ModelRegistry("toy").root == tmp_path.resolve() / "registry" / "toy"


def test_empty_registry(registry):
    assert registry.champion() is None
    assert registry.versions() == []
    assert registry.history() == []


def test_no_champion_hint_follows_the_last_decision(registry):
    """No run yet: run it. A refused challenger: the gate's summary. A promotion without a pointer: repair."""
    assert registry.no_champion_hint() == f"run `domainflow run {registry.domain}` first"
    registry.record_decision({"promote": False, "chosen": "ranker", "summary": "ties baseline next_item"})
    hint = registry.no_champion_hint()
    assert hint.startswith("its last run promoted nothing (") and hint.endswith("): ties baseline next_item")
    registry.record_decision({"promote": True, "chosen": "ranker", "summary": "beats everything"})
    assert registry.no_champion_hint().endswith(
        f"no champion pointer names it: `domainflow registry repair {registry.domain}`"
    )


def test_promote_creates_versions_and_moves_the_pointer(tmp_path, registry):
    card = tmp_path / "model_card.md"
    card.write_text("# card\n")
    first = promote(registry, fake_model(tmp_path, "one"), 0.91, model_card=card)
    assert first.version == 1
    assert registry.champion().version == 1
    assert (first.model_dir / "model.safetensors").read_bytes() == b"weights" * 100
    assert (first.path / "model_card.md").read_text() == "# card\n"
    assert json.loads((first.path / "decision.json").read_text()) == DECISION
    assert first.metrics == {"test": {"accuracy": 0.91}}
    assert first.lineage["candidate"] == "one" and first.lineage["previous_champion"] is None
    assert first.created_at == first.lineage["created_at"]

    second = promote(registry, fake_model(tmp_path, "two"), 0.93)
    assert second.version == 2
    assert registry.champion().version == 2
    assert second.lineage["previous_champion"] == 1
    assert [v.version for v in registry.versions()] == [1, 2]
    assert registry.get(1).metrics["test"]["accuracy"] == 0.91  # versions are immutable

    pointer = json.loads(registry.champion_file.read_text())
    assert pointer["version"] == 2 and pointer["previous"] == 1 and pointer["promoted_at"]
    events = registry.history()
    assert [(e["event"], e["version"], e["previous"]) for e in events] == [("promotion", 1, None), ("promotion", 2, 1)]
    assert not list(registry.versions_dir.glob(".tmp-*"))


def test_promote_rejects_missing_or_empty_model_dir(tmp_path, registry):
    with pytest.raises(RegistryError, match="not a directory"):
        promote(registry, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="empty"):
        promote(registry, tmp_path / "empty")
    assert registry.champion() is None


def test_expected_champion_guards_against_a_concurrent_promotion(tmp_path, registry):
    promote(registry, fake_model(tmp_path, "one"))
    with pytest.raises(RegistryError, match="another run promoted"):
        promote(registry, fake_model(tmp_path, "two"), expected_champion=None)
    assert promote(registry, fake_model(tmp_path, "three"), expected_champion=1).version == 2


def test_get_missing_version_names_the_path(tmp_path, registry):
    promote(registry, fake_model(tmp_path, "one"))
    with pytest.raises(RegistryError, match=r"no version 7 at .*versions/0007.*known versions: 1"):
        registry.get(7)


def test_version_without_model_dir_names_the_path(tmp_path, registry):
    info = promote(registry, fake_model(tmp_path, "one"))
    for item in info.model_dir.iterdir():
        item.unlink()
    info.model_dir.rmdir()
    with pytest.raises(RegistryError, match=str(info.model_dir)):
        registry.champion()
    with pytest.raises(RegistryError, match=str(info.model_dir)):
        registry.versions()


def test_champion_pointing_at_missing_version_names_the_path(tmp_path, registry):
    promote(registry, fake_model(tmp_path, "one"))
    registry.champion_file.write_text(json.dumps({"version": 9}))
    with pytest.raises(RegistryError, match=r"champion\.json points at version 9.*versions/0009"):
        registry.champion()


def test_corrupt_champion_pointer_raises(tmp_path, registry):
    promote(registry, fake_model(tmp_path, "one"))
    registry.champion_file.write_text("{not json")
    with pytest.raises(RegistryError, match="corrupt"):
        registry.champion()


# ---------------------------------------------------------------------------- rollback


def test_rollback_returns_to_the_previous_champion(tmp_path, registry):
    for name in ("one", "two", "three"):
        promote(registry, fake_model(tmp_path, name))
    back = registry.rollback(reason="v3 misbehaves")
    assert back.version == 2 and registry.champion().version == 2
    last = registry.history()[-1]
    assert last["event"] == "rollback" and last["from"] == 3 and last["to"] == 2 and last["reason"] == "v3 misbehaves"
    assert json.loads(registry.champion_file.read_text())["event"] == "rollback"

    assert registry.rollback().version == 1  # walks further back, does not toggle 2 <-> 3
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    assert registry.champion().version == 1
    assert [v.version for v in registry.versions()] == [1, 2, 3]  # rollback never deletes


def test_rollback_without_earlier_champion_raises(tmp_path, registry):
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()
    promote(registry, fake_model(tmp_path, "one"))
    history = registry.history_file.read_bytes()
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    assert registry.champion().version == 1
    assert registry.history_file.read_bytes() == history


def test_rollback_to_a_named_version_and_undo_it(tmp_path, registry):
    for name in ("one", "two", "three"):
        promote(registry, fake_model(tmp_path, name))
    assert registry.rollback(1, reason="pin").version == 1
    assert registry.rollback().version == 3  # undoing the pin returns to the champion before it
    with pytest.raises(RegistryError, match="already the champion"):
        registry.rollback(3)
    with pytest.raises(RegistryError, match="no version 8"):
        registry.rollback(8)
    assert registry.champion().version == 3


def test_promotion_after_rollback_can_be_undone(tmp_path, registry):
    promote(registry, fake_model(tmp_path, "one"))
    promote(registry, fake_model(tmp_path, "two"))
    registry.rollback()
    assert promote(registry, fake_model(tmp_path, "three")).version == 3
    assert registry.rollback().version == 1


# ---------------------------------------------------------------------------- crash safety


def test_failure_mid_copy_leaves_the_registry_unchanged(tmp_path, registry, monkeypatch):
    promote(registry, fake_model(tmp_path, "one"))
    before = snapshot(registry.root)
    copied = []
    real_copy = registry_module._copy_file

    def copy_then_crash(src, dst):
        if copied:
            raise OSError("disk full (simulated)")
        copied.append(dst)
        return real_copy(src, dst)

    monkeypatch.setattr(registry_module, "_copy_file", copy_then_crash)
    with pytest.raises(OSError, match="disk full"):
        promote(registry, fake_model(tmp_path, "two"))
    assert copied and Path(copied[0]).parent.parent.name.startswith(".tmp-")  # it really copied partly
    assert registry.champion().version == 1
    assert [v.version for v in registry.versions()] == [1]
    assert not list(registry.versions_dir.glob(".tmp-*"))
    assert snapshot(registry.root) == before

    monkeypatch.undo()
    assert promote(registry, fake_model(tmp_path, "three")).version == 2  # the number was not burnt


def test_crash_before_pointer_replace_keeps_the_old_champion(tmp_path, registry, monkeypatch):
    promote(registry, fake_model(tmp_path, "one"))
    old_pointer = registry.champion_file.read_bytes()
    before = snapshot(registry.root)
    real_replace = os.replace

    def crash_on_champion(src, dst, *args, **kwargs):
        if Path(dst).name == "champion.json":
            raise OSError("power cut (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(registry_module.os, "replace", crash_on_champion)
    with pytest.raises(OSError, match="power cut"):
        promote(registry, fake_model(tmp_path, "two"))
    monkeypatch.undo()

    assert registry.champion_file.read_bytes() == old_pointer
    assert json.loads(registry.champion_file.read_text())["version"] == 1
    assert [v.version for v in registry.versions()] == [1]  # the renamed version was taken back
    assert not list(registry.root.glob(".champion.json.*"))
    assert not list(registry.versions_dir.glob(".tmp-*"))
    # Everything but the history and the counter is as it was: the history now explains the failed
    # attempt (its intent, then why it was aborted) and v2 is burnt, so it can never name another model.
    unchanged = {k: v for k, v in before.items() if k not in ("history.jsonl", "state.json")}
    assert snapshot(registry.root, skip=("history.jsonl", "state.json")) == unchanged
    events = registry.history()
    assert [(e["event"], e["version"]) for e in events] == [
        ("promotion", 1),
        ("promotion", 2),
        ("promotion_aborted", 2),
    ]
    assert "power cut" in events[-1]["reason"]
    assert promote(registry, fake_model(tmp_path, "three")).version == 3
    assert registry.rollback().version == 1  # the aborted v2 never was a champion


def test_stale_temp_dir_from_a_killed_process_is_cleaned(tmp_path, registry):
    promote(registry, fake_model(tmp_path, "one"))
    stale = registry.versions_dir / ".tmp-deadbeef"
    (stale / "model").mkdir(parents=True)
    assert [v.version for v in registry.versions()] == [1]  # invisible to readers
    promote(registry, fake_model(tmp_path, "two"))
    assert not stale.exists()


def test_torn_last_history_line_is_tolerated(tmp_path, registry):
    promote(registry, fake_model(tmp_path, "one"))
    with open(registry.history_file, "a") as handle:
        handle.write('{"event": "promot')
    assert len(registry.history()) == 1
    promote(registry, fake_model(tmp_path, "two"))
    assert [e["version"] for e in registry.history() if e["event"] == "promotion"] == [1, 2]


def test_nan_metrics_are_stored_as_strict_json(tmp_path, registry):
    info = registry.promote(
        fake_model(tmp_path, "one"), metrics={"test": {"accuracy": float("nan")}}, lineage={}, decision={}
    )
    assert json.loads((info.path / "metrics.json").read_text()) == {"test": {"accuracy": None}}


# ---------------------------------------------------------------------------- version numbers


def test_version_numbers_are_not_reused_after_the_top_version_is_deleted(tmp_path, registry):
    for name in ("one", "two", "three"):
        promote(registry, fake_model(tmp_path, name))
    registry.rollback(reason="v3 is bad")
    shutil.rmtree(registry._version_path(3))  # someone deletes the bad version by hand

    # A reused 3 would make serving believe "same version, same model" and keep the deleted one in memory.
    assert promote(registry, fake_model(tmp_path, "four")).version == 4
    assert [v.version for v in registry.versions()] == [1, 2, 4]
    assert json.loads(registry.state_file.read_text()) == {"next_version": 5}
    assert registry.next_version() == 5


def test_a_registry_from_before_the_counter_numbers_past_every_version_it_knows(tmp_path, registry):
    for name in ("one", "two"):
        promote(registry, fake_model(tmp_path, name))
    registry.state_file.unlink()  # as an older domainflow left it
    assert registry.next_version() == 3
    assert promote(registry, fake_model(tmp_path, "three")).version == 3
    assert json.loads(registry.state_file.read_text()) == {"next_version": 4}

    # the counter and the top folder both gone: the history still remembers v3
    registry.rollback()
    registry.state_file.unlink()
    shutil.rmtree(registry._version_path(3))
    assert promote(registry, fake_model(tmp_path, "four")).version == 4


def test_a_corrupt_counter_numbers_from_what_the_registry_shows(tmp_path, registry, caplog):
    promote(registry, fake_model(tmp_path, "one"))
    registry.state_file.write_text("{torn")
    with caplog.at_level(logging.WARNING, logger="domainflow.registry"):
        assert promote(registry, fake_model(tmp_path, "two")).version == 2
    assert "state.json" in caplog.text
    assert json.loads(registry.state_file.read_text()) == {"next_version": 3}


# ---------------------------------------------------------------------------- manifests


def test_a_promoted_version_has_a_manifest_of_every_file(tmp_path, registry):
    card = tmp_path / "model_card.md"
    card.write_text("# card\n")
    info = promote(registry, fake_model(tmp_path, "one"), model_card=card)
    manifest = json.loads(info.manifest.read_text())
    on_disk = {
        p.relative_to(info.path).as_posix(): p for p in info.path.rglob("*") if p.is_file() and p != info.manifest
    }
    assert (
        set(manifest["files"])
        == set(on_disk)
        >= {
            "model/model.safetensors",
            "model/config.json",
            "metrics.json",
            "lineage.json",
            "decision.json",
            "model_card.md",
        }
    )
    for rel, path in on_disk.items():
        data = path.read_bytes()
        assert manifest["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    verify_version(info)
    assert registry.champion(verify=True).version == registry.load_champion().version == 1


def _flip_a_byte(info: VersionInfo) -> Path:
    path = info.model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    return path


def _remove_a_file(info: VersionInfo) -> Path:
    path = info.model_dir / "tokenizer.json"
    path.unlink()
    return path


def _add_a_file(info: VersionInfo) -> Path:
    path = info.model_dir / "stray.bin"
    path.write_bytes(b"not promoted")
    return path


def _edit_the_metrics(info: VersionInfo) -> Path:
    path = info.path / "metrics.json"
    path.write_text(json.dumps({"test": {"accuracy": 0.99}}))
    return path


@pytest.mark.parametrize(
    ("damage", "finding"),
    [
        (_flip_a_byte, "changed: sha256"),
        (_remove_a_file, "is missing"),
        (_add_a_file, "is an extra file"),
        (_edit_the_metrics, "changed: "),
    ],
    ids=["changed-byte", "missing-file", "extra-file", "edited-metrics"],
)
def test_verification_names_the_damaged_file(tmp_path, registry, damage, finding):
    promote(registry, fake_model(tmp_path, "one"))
    info = promote(registry, fake_model(tmp_path, "two"))
    path = damage(info)

    with pytest.raises(RegistryError, match=re.escape(f"{path} {finding}")):
        verify_version(info)
    with pytest.raises(RegistryError, match=re.escape(str(path))):
        registry.load_champion()
    assert registry.champion().version == 2  # the polled read stays cheap: it does not hash
    registry.rollback()
    with pytest.raises(RegistryError, match=re.escape(str(path))):
        registry.rollback(2)  # rolling forward onto damaged files is refused
    assert registry.champion().version == 1


def test_a_version_without_a_manifest_loads_with_a_warning(tmp_path, registry, caplog):
    info = promote(registry, fake_model(tmp_path, "one"))
    info.manifest.unlink()  # as promoted by an older domainflow
    with caplog.at_level(logging.WARNING, logger="domainflow.registry"):
        assert registry.load_champion().version == 1
    assert "v1 has no" in caplog.text and "not verified" in caplog.text


# ---------------------------------------------------------------------------- concurrency


def _promote_three(root: str, source: str, start) -> None:
    start.wait(10)
    registry = ModelRegistry("toy", root=Path(root))
    for _ in range(3):
        registry.promote(Path(source), metrics={"pid": os.getpid()}, lineage={"candidate": "c"}, decision={})


def test_concurrent_promotions_get_distinct_versions(tmp_path, registry):
    source = fake_model(tmp_path, "shared")
    ctx = multiprocessing.get_context("spawn")  # fork after torch/Prefect threads exist can hang or crash a child
    start = ctx.Event()
    workers = [ctx.Process(target=_promote_three, args=(str(registry.root), str(source), start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        assert wait_for_exit(worker, "a promoting process") == 0
    versions = registry.versions()
    assert [v.version for v in versions] == [1, 2, 3, 4, 5, 6]
    assert len({v.metrics["pid"] for v in versions}) == 2
    promotions = [e for e in registry.history() if e["event"] == "promotion"]
    assert sorted(e["version"] for e in promotions) == [1, 2, 3, 4, 5, 6]
    assert registry.champion().version == 6
    assert not list(registry.versions_dir.glob(".tmp-*"))


# ---------------------------------------------------------------------------- decisions + deploy


def test_record_decision_writes_file_and_history(registry):
    path = registry.record_decision({"promote": False, "chosen": "fine/tuned", "summary": "keep"})
    assert path.parent == registry.decisions_dir and path.name.endswith("-fine-tuned.json")
    assert json.loads(path.read_text())["summary"] == "keep"
    second = registry.record_decision({"promote": False, "chosen": None, "summary": "nothing"})
    assert second != path and second.name.endswith("-none.json")
    assert [e["event"] for e in registry.history()] == ["rejection", "rejection"]
    assert registry.decisions() == [path, second]


SPEC = DomainSpec(
    name="toy",
    description="toy domain",
    source=DataSource(train="train.csv", test="test.csv"),
    text_column="text",
    label_column="label",
    label_names=("a", "b"),
    gates=QualityGates(
        min_metrics={"accuracy": 0.90}, tie_tolerance=0.001, max_compression_drop=0.01, min_compression_speedup=1.3
    ),
)


def evaluation(
    tmp_path: Path, name: str, accuracy: float, *, tps: float = 100.0, parent=None, compression=None, card: bool = True
) -> Evaluation:
    model = fake_model(tmp_path, name, payload=name.encode())
    report = tmp_path / "reports" / name
    report.mkdir(parents=True)
    if card:
        (report / "model_card.md").write_text(f"# {name}\n")
    return Evaluation(
        candidate=ModelRef(
            name=name, path=str(model), fingerprint=path_fingerprint(model), parent=parent, compression=compression
        ),
        test_metrics={"accuracy": accuracy, "macro_f1": accuracy - 0.01},
        validation_metrics={"accuracy": accuracy},
        texts_per_second_batch1=tps / 4,
        texts_per_second_batch32=tps,
        latency_ms_p50=5.0,
        latency_ms_p95=9.0,
        size_bytes=1000,
        disk_bytes=1200,
        parameters=10,
        report_dir=str(report),
    )


def deploy_once(tmp_path, registry, evaluations, champion_metrics=None, test_fp="test-fp"):
    return apply_decision(SPEC, evaluations, champion_metrics, "data-fp", test_fp, {"epochs": 1}, registry=registry)


def test_apply_decision_promotes_then_records_a_failed_gate_without_touching_the_champion(tmp_path, registry):
    first_dir = tmp_path / "run1"
    parent = evaluation(first_dir, "finetuned", 0.93)
    child = evaluation(first_dir, "finetuned-int8", 0.925, tps=160.0, parent="finetuned", compression="int8")
    passed = deploy_once(first_dir, registry, [parent, child])
    assert passed["promote"] is True and passed["chosen"] == "finetuned-int8" and passed["version"] == 1
    info = registry.champion()
    assert passed["champion_dir"] == str(info.model_dir)
    assert (info.model_dir / "model.safetensors").read_bytes() == b"finetuned-int8" * 100
    assert (info.path / "model_card.md").read_text() == "# finetuned-int8\n"
    assert info.metrics["test"]["accuracy"] == 0.925 and info.metrics["speed"]["texts_per_second_batch32"] == 160.0
    assert info.metrics["size"] == {"size_bytes": 1000, "disk_bytes": 1200, "parameters": 10}
    lineage = info.lineage
    assert lineage["dataset_fingerprint"] == "data-fp" and lineage["test_fingerprint"] == "test-fp"
    assert (
        lineage["candidate"] == "finetuned-int8"
        and lineage["parent"] == "finetuned"
        and lineage["compression"] == "int8"
    )
    assert lineage["run_config"] == {"epochs": 1} and "git_commit" in lineage
    assert json.loads(Path(passed["decision_file"]).read_text())["promote"] is True
    assert [e["event"] for e in registry.history()] == ["decision", "promotion"]

    before = snapshot(registry.root, skip=("decisions", "history.jsonl"))
    history_before = registry.history()
    worse = evaluation(tmp_path / "run2", "finetuned", 0.91)
    failed = deploy_once(tmp_path / "run2", registry, [worse])  # champion metrics resolved from the registry
    assert failed["promote"] is False and failed["version"] is None
    assert failed["champion_metrics"] == {"accuracy": 0.925, "macro_f1": 0.915}
    assert failed["champion_dir"] == str(info.model_dir) and failed["previous_champion"] == 1
    assert "worse" in failed["summary"]
    assert snapshot(registry.root, skip=("decisions", "history.jsonl")) == before
    assert registry.champion().version == 1
    assert registry.history()[: len(history_before)] == history_before
    assert [e["event"] for e in registry.history()[len(history_before) :]] == ["rejection"]
    stored = json.loads(Path(failed["decision_file"]).read_text())
    assert stored["promote"] is False and stored["verdicts"][0]["name"] == "finetuned"
    assert len(registry.decisions()) == 2


def test_apply_decision_records_a_floor_failure_on_an_empty_registry(tmp_path, registry):
    result = deploy_once(tmp_path, registry, [evaluation(tmp_path, "finetuned", 0.85)])
    assert result["promote"] is False and result["chosen"] is None and result["version"] is None
    assert result["champion_dir"] is None
    assert registry.champion() is None and registry.versions() == []
    assert [e["event"] for e in registry.history()] == ["rejection"]
    assert "accuracy 0.850 < floor 0.900" in json.loads(Path(result["decision_file"]).read_text())["summary"]


def test_apply_decision_needs_champion_metrics_on_the_same_test_set(tmp_path, registry):
    deploy_once(tmp_path / "a", registry, [evaluation(tmp_path / "a", "finetuned", 0.93)])
    assert champion_metrics_for("toy", "test-fp", registry=registry) == {"accuracy": 0.93, "macro_f1": 0.92}
    assert champion_metrics_for("toy", "other-test", registry=registry) is None
    with pytest.raises(RegistryError, match="evaluate the champion on the new test set"):
        deploy_once(tmp_path / "b", registry, [evaluation(tmp_path / "b", "finetuned", 0.99)], test_fp="other-test")
    # with the champion re-measured on the new test set, the gate runs
    result = deploy_once(
        tmp_path / "c",
        registry,
        [evaluation(tmp_path / "c", "finetuned", 0.99)],
        champion_metrics={"accuracy": 0.95},
        test_fp="other-test",
    )
    assert result["promote"] is True and result["version"] == 2


def test_champion_metrics_for_reads_settings_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINFLOW_HOME", str(tmp_path))
    assert champion_metrics_for("toy", "anything") is None


def test_decision_report_has_every_candidate_and_its_numbers(tmp_path, registry):
    parent = evaluation(tmp_path, "finetuned", 0.93)
    slow = evaluation(tmp_path, "finetuned-int8", 0.929, tps=110.0, parent="finetuned", compression="int8")
    result = deploy_once(tmp_path, registry, [parent, slow])
    markdown = decision_markdown(result, [parent, slow])
    assert "Promoted `finetuned` as v1" in markdown
    assert "`finetuned-int8`" in markdown and "only 1.10x faster" in markdown and "0.9290" in markdown
    rows = candidate_rows(result, [parent, slow])
    assert [r["candidate"] for r in rows] == ["finetuned", "finetuned-int8"]
    assert rows[0]["chosen"] is True and rows[1]["eligible"] is False
    assert artifact_key("customer_service", "gate-decision") == "customer-service-gate-decision"
