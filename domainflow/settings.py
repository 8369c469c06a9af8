"""One module owns every path and every environment default.

Why here: Prefect and the Hugging Face libraries read their settings from the
environment *at import time*, so entry points call :func:`configure_environment`
before importing them. Every value is a ``setdefault``: a user's own setting wins.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """The domainflow home (``DOMAINFLOW_HOME``, default ``./.domainflow``): registry, runs, caches."""
    return Path(os.environ.get("DOMAINFLOW_HOME", ".domainflow")).expanduser().resolve()


def data_dir() -> Path:
    """Where shipped and fetched datasets live (``DOMAINFLOW_DATA_DIR``, default ``<project>/data``)."""
    return Path(os.environ.get("DOMAINFLOW_DATA_DIR", PROJECT_ROOT / "data")).expanduser().resolve()


def registry_dir() -> Path:
    return home() / "registry"


def runs_dir() -> Path:
    """Outputs of pipeline steps, content-addressed by each step's inputs."""
    return home() / "runs"


def online() -> bool:
    """Hub look-ups are off unless ``DOMAINFLOW_ONLINE=1``: the defaults need no network,
    and an offline hub look-up otherwise retries for ~20 s before failing."""
    return os.environ.get("DOMAINFLOW_ONLINE", "0").lower() in {"1", "true", "yes"}


def configure_environment() -> None:
    """Point Prefect's and Hugging Face's state inside the domainflow home; go offline by default."""
    root = home()
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server gets 20 s to start by default; a 2-core machine busy training misses that.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(root / "results"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load weight reports in run logs
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # saving/mapping bars drown the training bar
    # OpenMP threads (torch's intra-op pool) sleep at barriers instead of spinning. On a 2-core
    # machine shared with other jobs, spinning siblings starve the thread that has the work:
    # MiniLM at 2 threads measured 6-10x slower at batch 1 and ~4x at batch 32 than with
    # PASSIVE. The price on a quiet machine: ~10-20% slower torch forwards (ONNX Runtime models
    # are not affected). Set OMP_WAIT_POLICY= (empty) for the library default on dedicated
    # hardware. Read when torch loads, so it only works because entry points call this first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Prefect creates only the last folder of PREFECT_HOME, and complains when its parent is missing.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    if not online():
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
