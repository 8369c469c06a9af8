"""Process-wide locks for what must not run in two threads of one process at once.

Several domains can run in threads of one process (``domainflow run --all --workers N``). Their evaluations and
compressions may overlap; two things may not, each measured with three domains in three threads:

* ``TRAINING`` — a training loop. Parts of torch and accelerate keep process-wide state that a training step
  mutates: one domain's Trainer failed with "AcceleratorState has no attribute distributed_type" (another Trainer
  had reset the shared state), another domain's two-tower loop with ``KeyError: 'custom'`` inside
  ``optimizer.zero_grad()`` (torch.fx's annotation metadata is a module global). On a machine where one training
  already uses every core, serialising them costs nothing.
* ``PARSING`` — turning Python source into an AST: CPython 3.11's AST conversion keeps a recursion counter that two
  threads can interleave ("AST constructor recursion depth mismatch"). Our code fingerprints parse imports, and
  Prefect parses a flow's docstring each time a flow object is made (``Flow.with_options``).

Across processes (Dask, Ray, DDP) each process has its own locks and nothing is shared.
"""

from __future__ import annotations

import threading

TRAINING = threading.Lock()
PARSING = threading.Lock()
