"""What training a candidate cost: trainable parameters and the peak resident memory while it trained.

These go into the candidate's ``domainflow.json`` (under :data:`FOOTPRINT_KEY`) when it is trained, and
evaluation reports them beside its quality, so the candidate table can show what a parameter-efficient
candidate saves against a full fine-tune.

Why a sampling thread rather than the process's peak (``ru_maxrss``, ``VmHWM``): in a pipeline process that
has already embedded a dataset or loaded other models, the process's peak says nothing about this training,
and resetting it (``/proc/self/clear_refs``) would also falsify any outer measurement of the whole run
(``/usr/bin/time``). Resident memory is read every :data:`SAMPLE_SECONDS`, so a spike shorter than that can
be missed; training's memory is dominated by weights, optimizer state and activations that stay resident for
the whole run. Steps running in other threads of the same process (a runner with several workers) count too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from domainflow import process_locks
from domainflow.peft_models import adapter_bytes
from domainflow.training_keys import FEDERATED_KEY, PRIVACY_KEY

FOOTPRINT_KEY = "training_footprint"
SAMPLE_SECONDS = 0.05
_STATM = "/proc/self/statm"


def resident_bytes() -> int | None:
    """Resident memory of this process now (Linux ``/proc``); None where it cannot be read."""
    try:
        with open(_STATM) as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class PeakMemory:
    """The highest resident memory seen while the ``peak_rss`` block ran (None: not measurable here)."""

    peak_bytes: int | None = None

    @property
    def megabytes(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def see(self, value: int | None) -> None:
        if value is not None and (self.peak_bytes is None or value > self.peak_bytes):
            self.peak_bytes = value


@contextmanager
def peak_rss(interval: float = SAMPLE_SECONDS) -> Iterator[PeakMemory]:
    """Sample the process's resident memory in a daemon thread while the block runs; the peak is final on exit."""
    peak = PeakMemory()
    peak.see(resident_bytes())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak.see(resident_bytes())

    sampler = threading.Thread(target=sample, name="peak-rss-sampler", daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak.see(resident_bytes())


@dataclass
class TrainingSection:
    """A training loop's wall time (from when it held the lock) and its peak memory (see :func:`training_section`)."""

    started: float
    peak: PeakMemory

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@contextmanager
def training_section() -> Iterator[TrainingSection]:
    """The one way into a training loop: it holds ``process_locks.TORCH_GLOBALS`` (training mutates process-wide
    torch state, and seeded runs draw from torch's global generator: two loops at once in threads of one process
    break each other or their reproducibility), and times the loop and samples its peak memory from the moment it
    holds the lock — waiting for another domain's training is not this model's cost."""
    with process_locks.TORCH_GLOBALS:
        with peak_rss() as peak:
            yield TrainingSection(time.perf_counter(), peak)


def trainable_parameters(model: nn.Module) -> int:
    """Parameters the optimizer updates (``requires_grad``): all of them for a full fine-tune, the adapter and
    the head for a parameter-efficient one."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def footprint(model: nn.Module, peak: PeakMemory, seconds: float) -> dict[str, Any]:
    """The :data:`FOOTPRINT_KEY` entry of a trained candidate's metadata."""
    return {
        "trainable_parameters": trainable_parameters(model),
        "peak_rss_mb": None if peak.megabytes is None else round(peak.megabytes, 1),
        "seconds": round(seconds, 1),
    }


def training_figures(metadata: dict[str, Any]) -> dict[str, Any]:
    """What evaluation reports of a candidate's training, from its metadata: the footprint recorded when it was
    trained (a compressed copy carries its parent's), for a PEFT candidate ``adapter_bytes``, and for a DP or
    federated candidate its :data:`PRIVACY_KEY` / :data:`FEDERATED_KEY` record. Empty for
    a candidate trained before footprints were recorded, or not by the Trainer (the linear probe)."""
    figures = dict(metadata.get(FOOTPRINT_KEY) or {})
    for key in (PRIVACY_KEY, FEDERATED_KEY):  # a compressed copy carries its parent's, as it does the footprint
        if isinstance(metadata.get(key), dict):
            figures[key] = dict(metadata[key])
    extra = adapter_bytes(metadata)
    if extra is not None:
        figures["adapter_bytes"] = extra
    return figures


def training_columns(figures: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's training figures as table columns (None where not recorded): trainable parameters, peak
    resident memory while training (MB), and a PEFT candidate's adapter + head on disk (MB)."""
    peak, extra = figures.get("peak_rss_mb"), figures.get("adapter_bytes")
    return {
        "trainable_parameters": figures.get("trainable_parameters"),
        "train_peak_rss_mb": None if peak is None else round(float(peak)),
        "adapter_mb": None if extra is None else round(extra / 1e6, 3),
    }
