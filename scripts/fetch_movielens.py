"""Fetch MovieLens-100K into data/ml-100k/ (git-ignored) from the recbole==1.2.1 wheel; idempotent.

.venv/bin/python scripts/fetch_movielens.py [TARGET_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domainflow.recsys.movielens import fetch_movielens  # noqa: E402

if __name__ == "__main__":
    fetch_movielens(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
