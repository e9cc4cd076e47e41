#!/usr/bin/env bash
# Installs dpo-orchestrator into the current Python environment.
#   bash scripts/install.sh            # the package
#   bash scripts/install.sh test       # the package plus an extra (test, lora, optuna, bench, dev)
# An installed torch (CPU or CUDA) is kept. Without one, a machine with no NVIDIA GPU gets the CPU
# build of TORCH_VERSION (never the multi-GB CUDA packages); a GPU machine gets the CUDA build of the
# same version (PyPI's Linux default), so a cluster's head and GPU workers run one torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PYTHON="${PYTHON:-python}"
TORCH_VERSION="${TORCH_VERSION:-${CPU_TORCH_VERSION:-2.13.0}}"

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "install: keeping installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: NVIDIA GPU found, installing CUDA torch ${TORCH_VERSION}"
  "$PYTHON" -m pip install "torch==${TORCH_VERSION}"
else
  echo "install: no GPU, installing CPU torch ${TORCH_VERSION}"
  "$PYTHON" -m pip install "torch==${TORCH_VERSION}" \
    || "$PYTHON" -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi

target="."
[ -n "$extra" ] && target=".[${extra}]"
"$PYTHON" -m pip install -e "$target"
