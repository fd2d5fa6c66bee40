#!/usr/bin/env bash
# Creates the project-local environment: .venv (torch, test and benchmark dependencies, maturin)
# and .tools/cuda13 (nvcc 13.0 from PyPI, kept apart from torch's newer CUDA runtime packages).
# Idempotent: a stamp file per step records what is already installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.deps-$(sha1sum scripts/requirements-dev.txt | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r scripts/requirements-dev.txt
  touch "$stamp"
fi
nvcc_stamp=.tools/cuda13/.installed-13.0
if [ "${QLORA_RS_NO_NVCC:-0}" != 1 ] && [ ! -f "$nvcc_stamp" ]; then
  rm -rf .tools/cuda13
  .venv/bin/python -m pip install -q --target .tools/cuda13 \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*"
  touch "$nvcc_stamp"
fi
