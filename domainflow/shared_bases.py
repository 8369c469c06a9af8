"""Base encoders shared by the adapter models of one process: loaded and verified once, dropped when unused.

Why: a PEFT champion (see :mod:`domainflow.peft_models`) is a few hundred kilobytes of adapter and head on a
pretrained base encoder. Loaded with its adapter merged, every domain holds a full copy of the base (90 MB of
fp32 weights for MiniLM-L6); a service with three such domains on the same base holds three. Here the base is
loaded once per ``(path, layer count, fingerprint)``, its fingerprint checked once, and every domain's model
keeps only what is its own (adapter and head) over the same weight tensors.

How the weights are shared, and why not with peft's own adapter switching: peft can hold several adapters in
one ``PeftModel`` and pick one per call (``set_adapter``) or per row (LoRA's ``adapter_names`` argument). Both
change state shared by every caller: ``set_adapter`` flips the active adapter of every layer, and
``adapter_names`` works by registering forward pre-hooks on the shared layers for the length of the call, so two
threads calling at once would each run with the other's adapter, or with both hooks; correct use needs one lock
around switch-and-forward for all domains of a base. peft also refuses to put a LoRA and an IA3 adapter in one
model (``PeftMixedModel`` combines LoRA-like kinds only; IA3 is not among them). Instead each model gets a module
tree of its own whose parameters and buffers *are* the base's tensors (a deep copy with every tensor mapped to
itself: new Python objects, no new weight storage), and peft injects that model's adapter into its own tree.
Nothing is switched at call time, so the models of different domains run concurrently without a lock, any mix
of LoRA and IA3 adapters shares one base, and replacing one domain's model (a hot swap) touches no other.

What it costs: the adapter stays unmerged, so each call computes the adapter's extra work (LoRA: two thin
matmuls per adapted Linear; IA3: an elementwise scaling), which a merged copy does not. ``domainflow serve
--merge-adapters`` trades the memory back for that speed.

Why weak references: the cache holds a base only while some model uses it (each model keeps a strong reference
to its :class:`SharedBase`); when the last model on a base is gone (its domain swapped to a champion on another
base, or the service stopping), the base is freed with it, and a later model on it loads it again.

The base's tensors are never written to: an adapter on a shared base is never merged (merging adds the update
into the base weights in place, which would change every other model on them).
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from domainflow.peft_models import BaseEncoder, load_base_encoder

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseKey:
    """What identifies a loaded base: where it is (resolved), how many of its layers, and its weights' digest."""

    path: str
    num_layers: int | None
    fingerprint: str

    @classmethod
    def of(cls, base: BaseEncoder) -> BaseKey:
        local = Path(base.path).expanduser()
        path = str(local.resolve()) if local.exists() else base.path  # one entry however the folder is spelled
        return cls(path, base.num_layers, base.fingerprint)


class SharedBase:
    """One loaded and verified base encoder. Every model built on it holds a reference to this object, which
    is what keeps it in the cache (see the module docstring)."""

    def __init__(self, key: BaseKey, encoder: nn.Module) -> None:
        self.key = key
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)

    def __deepcopy__(self, memo: dict[int, object]) -> SharedBase:
        """Itself: a deep copy of a model on this base (a quantization recipe makes one) must not copy the base
        along with the model's reference to it."""
        return self

    def private_tree(self) -> nn.Module:
        """A module tree of its own for one model, whose parameters and buffers are this base's tensors.

        ``copy.deepcopy`` consults its memo before copying anything: with every parameter and buffer of the base
        mapped to itself, the modules (and the config) are new objects and no tensor is copied. peft then wraps
        the new tree's layers, so what it adds belongs to one model only."""
        tensors = itertools.chain(self.encoder.parameters(), self.encoder.buffers())
        return copy.deepcopy(self.encoder, {id(tensor): tensor for tensor in tensors})


class SharedBaseCache:
    """The bases in use in this process, by :class:`BaseKey`; ``loads`` counts the loads from disk."""

    def __init__(self) -> None:
        self._bases: weakref.WeakValueDictionary[BaseKey, SharedBase] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()  # two models asking for an unloaded base at once must not load it twice
        self.loads = 0

    def get(self, base: BaseEncoder, *, needed_by: str) -> SharedBase:
        """The loaded base ``base`` names: from the cache, else loaded and its fingerprint checked (an
        :class:`~domainflow.peft_models.AdapterError` when it is missing or its weights are not the recorded ones).
        """
        key = BaseKey.of(base)
        with self._lock:
            shared = self._bases.get(key)
            if shared is None:
                loaded = load_base_encoder(base.model_copy(update={"path": key.path}), needed_by=needed_by)
                shared = SharedBase(key, loaded)
                self._bases[key] = shared
                self.loads += 1
                log.info("loaded base encoder %s (fingerprint %s) for shared use", base.describe(), key.fingerprint)
            return shared

    def resident(self) -> list[BaseKey]:
        """The bases some live model still uses."""
        with self._lock:
            return list(self._bases.keys())


#: The process's cache: ``load_classifier(..., share_base=True)`` goes through it.
SHARED_BASES = SharedBaseCache()
