"""Process-wide locks for what must not run in two threads of one process at once.

Several domains can run in threads of one process (``domainflow run --all --workers N``). Their evaluations and
compressions may overlap; two things may not, each measured with three domains in three threads:

* ``TORCH_GLOBALS`` — a training loop (every trainer enters it through ``domainflow.footprint.training_section``:
  fine-tune and its kin, DP-SGD, federated, the two-tower) or a ``torch.export`` (our ONNX export). Both mutate
  process-wide state of torch and accelerate: one domain's Trainer failed with "AcceleratorState has no attribute
  distributed_type" (another Trainer had reset the shared state). ``torch.export`` sets a process-wide "exporting"
  flag, and while it is set every ``torch._disable_dynamo``-wrapped call in *any* thread (``optimizer.zero_grad()``
  is one) adds and then deletes a key of torch.fx's module-global annotation dict; a two-tower training step beside
  another domain's ONNX export failed with ``KeyError: 'custom'`` (seen in CI, with the training loops already
  serialised). Seeded loops also draw from torch's global generator. On a machine where one training already uses
  every core, serialising them costs nothing.
* ``PARSING`` — turning Python source into an AST: CPython 3.11's AST conversion keeps a recursion counter that two
  threads can interleave ("AST constructor recursion depth mismatch"). Our code fingerprints parse imports, and
  Prefect parses a flow's docstring each time a flow object is made (``Flow.with_options``).

Across processes (Dask, Ray, DDP) each process has its own locks and nothing is shared.
"""

from __future__ import annotations

import threading

TORCH_GLOBALS = threading.Lock()
PARSING = threading.Lock()
