"""Which model answers for each domain, and the hot swap when the registry's champion changes.

Why polling ``champion.json``: the registry is files with one atomic pointer (``os.replace``), so
a ``stat`` per domain per second is a complete and cheap change signal that needs no message
bus and works whoever promotes (a pipeline run, a scheduled retrain, ``registry rollback``).
The inode is part of the signature: ``os.replace`` always installs a new inode, so a swap is
seen even when two swaps fall within the file system's timestamp granularity.

A new champion is loaded *beside* the current one, in a background thread, and warmed up with
one prediction (a model that loads but cannot predict must not go live); only then is the
reference swapped, a single assignment. Batches already running keep the model object they
started with, so in-flight requests finish on the old version; the next batch uses the new one.
A load that fails keeps the old model serving, records the error (``/v1/domains``, metrics,
log) and is retried when the pointer changes again or after ``retry_failed_load_seconds``.

A champion that is an adapter (LoRA, IA3: see :mod:`domainflow.peft_models`) is served, by default, unmerged on
the base encoder its folder names, loaded once for all the domains on it (:mod:`domainflow.shared_bases`): a hot
swap of one domain replaces its adapter and head only, and the other domains' models are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from domainflow.modeling import LoadedClassifier, load_classifier, predict_proba
from domainflow.outofscope import OutOfScopeDetector, check_detector
from domainflow.registry import ModelRegistry, VersionInfo
from domainflow.retrieval import QuestionIndex
from domainflow.spec import ClassificationSpec, DomainSpec

log = logging.getLogger("domainflow.serving")

Signature = tuple[int, int, int]  # inode, mtime_ns, size of champion.json


@dataclass(frozen=True)
class ServedModel:
    """One loaded champion: immutable, so a batch can hold it while another replaces it."""

    domain: str
    version: int
    candidate: str | None
    model_dir: Path
    loaded: LoadedClassifier | Any  # a Recommender for a ranking domain (serving.ranking)
    loaded_at: str
    index: QuestionIndex | None = None  # known questions, for a domain with a retrieval fallback
    out_of_scope: OutOfScopeDetector | None = None  # for a domain with out-of-scope detection

    @property
    def label_names(self) -> list[str]:
        return list(getattr(self.loaded, "label_names", []))

    @classmethod
    def of(
        cls,
        domain: str,
        info: VersionInfo,
        loaded: Any,
        index: QuestionIndex | None = None,
        out_of_scope: OutOfScopeDetector | None = None,
    ) -> ServedModel:
        """A freshly loaded registry version, stamped with its version, candidate and load time."""
        return cls(
            domain=domain,
            version=info.version,
            candidate=info.lineage.get("candidate"),
            model_dir=info.model_dir,
            loaded=loaded,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            index=index,
            out_of_scope=out_of_scope,
        )


@dataclass
class DomainSlot:
    """A served domain: its spec, its registry, the model in use and what went wrong last."""

    domain: str
    spec: DomainSpec
    registry: ModelRegistry
    current: ServedModel | None = None
    champion_version: int | None = None  # what the pointer says (may differ while loading or after a failed load)
    last_error: str | None = None
    signature: Signature | None = None
    failed_at: float | None = None
    loads: int = 0
    # why nothing serves while the registry has no champion pointer (ModelRegistry.no_champion_hint), re-read by the
    # watcher when the decisions folder changes, so that a 503 answers without touching the disk
    no_champion_reason: str | None = None
    decisions_signature: Signature | None = None
    share_base: bool = True  # an adapter champion keeps its adapter unmerged on the process's shared base encoder

    @property
    def status(self) -> str:
        if self.current is None:
            return "load_failed" if self.last_error else "no_champion"
        if self.last_error:
            return "serving_previous"  # a newer champion failed to load; the old one answers
        return "serving"


def _pointer_signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_served_model(slot: DomainSlot, info: VersionInfo) -> ServedModel:
    """Load a version, check it fits the domain, and run one prediction (blocking: call in a thread)."""
    spec = slot.spec.as_kind(ClassificationSpec)
    loaded = load_classifier(info.model_dir, share_base=slot.share_base)
    shared = getattr(loaded.model, "shared_base", None)
    if shared is not None:
        log.info("%s v%d: its adapter serves on the shared base encoder %s", slot.domain, info.version, shared.key.path)
    declared = spec.label_names  # None: the domain takes its labels from its data, and the model carries them
    unknown = sorted(set(loaded.label_names) - set(declared)) if declared is not None else []
    if unknown:
        raise ValueError(f"{slot.domain} v{info.version}: labels unknown to the domain: {unknown[:5]}")
    probabilities = predict_proba(loaded, ["warm-up: is this model able to predict?"])
    if probabilities.shape != (1, len(loaded.label_names)) or not bool(probabilities.isfinite().all()):
        raise ValueError(f"{slot.domain} v{info.version}: warm-up prediction is not a finite probability row")
    index = QuestionIndex.load(info.model_dir) if spec.retrieval is not None else None
    if index is not None and set(index.labels) - set(loaded.label_names):
        raise ValueError(f"{slot.domain} v{info.version}: its retrieval index names labels the model does not know")
    # A champion promoted before the domain turned detection on has no detector: it serves without one.
    detection = spec.out_of_scope is not None and spec.out_of_scope.enabled
    detector = OutOfScopeDetector.load(info.model_dir) if detection else None
    if detector is not None:  # it must score this model's outputs (a mismatched file fails here, not per request)
        check_detector(detector, loaded, f"{slot.domain} v{info.version}")
    return ServedModel.of(slot.domain, info, loaded, index, detector)


@dataclass
class ModelStore:
    """The served domains and the watcher that keeps each on its registry's champion."""

    slots: dict[str, DomainSlot]
    poll_seconds: float = 1.0
    retry_failed_load_seconds: float = 30.0
    on_load: Callable[[DomainSlot, bool], None] | None = None  # (slot, succeeded): metrics hook
    loader: Callable[[DomainSlot, VersionInfo], ServedModel] = load_served_model  # how a champion becomes a ServedModel
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _task: asyncio.Task | None = None

    @classmethod
    def for_domains(
        cls, specs: dict[str, DomainSpec], registry_root: Path, *, share_base: bool = True, **kwargs
    ) -> ModelStore:
        """Slots for ``specs``; ``share_base=False`` serves adapter champions merged, each a full copy (faster)."""
        slots = {
            name: DomainSlot(name, spec, ModelRegistry(name, root=Path(registry_root) / name), share_base=share_base)
            for name, spec in specs.items()
        }
        return cls(slots, **kwargs)

    def get(self, domain: str) -> DomainSlot:
        return self.slots[domain]

    async def refresh(self) -> None:
        """Bring every slot up to date with its champion pointer (loads one domain at a time)."""
        async with self._lock:
            for slot in self.slots.values():
                await self._refresh_slot(slot)

    async def _refresh_slot(self, slot: DomainSlot) -> None:
        signature = _pointer_signature(slot.registry.champion_file)
        retry_due = (
            slot.last_error is not None
            and slot.failed_at is not None
            and time.monotonic() - slot.failed_at >= self.retry_failed_load_seconds
        )
        if signature == slot.signature and not retry_due:
            if signature is None:
                await self._note_why_no_champion(slot)
            return
        if signature is None:  # no pointer (never promoted, or removed by hand): keep whatever serves
            slot.signature = None
            await self._note_why_no_champion(slot)
            return
        try:
            pointer = slot.registry.champion_pointer()
            version = int(pointer["version"]) if pointer else None
        except Exception as exc:  # a corrupt pointer must not stop the service
            self._failed(slot, signature, f"cannot read {slot.registry.champion_file}: {exc}")
            return
        slot.champion_version = version
        if version is None or (slot.current is not None and slot.current.version == version):
            slot.signature, slot.last_error, slot.failed_at = signature, None, None
            return
        previous = slot.current.version if slot.current else None
        log.info(
            "%s: champion is now v%s (serving %s): loading it",
            slot.domain,
            version,
            f"v{previous}" if previous else "nothing",
        )
        try:
            # verify: the files must match the version's manifest before they go live (a damaged
            # version fails this load and the old model keeps serving)
            info = await asyncio.to_thread(slot.registry.get, version, verify=True)
            served = await asyncio.to_thread(self.loader, slot, info)
        except Exception as exc:
            self._failed(slot, signature, f"loading v{version} failed: {type(exc).__name__}: {exc}")
            return
        slot.current = served  # the swap: batches already running hold the old object
        slot.signature, slot.last_error, slot.failed_at = signature, None, None
        slot.loads += 1
        log.info("%s: now serving v%d (%s)", slot.domain, served.version, served.model_dir)
        if self.on_load:
            self.on_load(slot, True)

    @staticmethod
    async def _note_why_no_champion(slot: DomainSlot) -> None:
        """Keep ``slot.no_champion_reason`` current: re-read (off the event loop) only when a decision was written
        since, which renames a file into the decisions folder and so moves the folder's signature."""
        decisions = _pointer_signature(slot.registry.decisions_dir)
        if slot.no_champion_reason is None or decisions != slot.decisions_signature:
            slot.no_champion_reason = await asyncio.to_thread(slot.registry.no_champion_hint)
            slot.decisions_signature = decisions

    def _failed(self, slot: DomainSlot, signature: Signature, message: str) -> None:
        serving = f"still serving v{slot.current.version}" if slot.current else "nothing to serve"
        log.error("%s: %s; %s", slot.domain, message, serving)
        slot.signature, slot.last_error, slot.failed_at = signature, message, time.monotonic()
        if self.on_load:
            self.on_load(slot, False)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.refresh()
            except Exception:  # the watcher must outlive any surprise; the next poll tries again
                log.exception("champion watcher: refresh failed")

    def start_watching(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="champion-watcher")

    async def stop_watching(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
