#!/usr/bin/env bash
# Runs the test suite against the oldest supported torch and transformers (2.11 and 5.17, what the
# GPU machines have) with qlora-rs installed from its wheel, not the source tree: this also proves
# the wheel ships every file (type stubs, datasets). Uses .venv-torch2.11 beside .venv (created and filled once).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); cd "$root"
PY=${PYTHON:-python3}
venv=.venv-torch2.11
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
stamp=$venv/.deps-$(sha1sum scripts/requirements-dev.txt "$0" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r scripts/requirements-dev.txt "torch==2.11.*" "transformers==5.17.*"
  touch "$stamp"
fi
rm -rf target/wheels-oldest-torch
.venv/bin/maturin build --release --quiet --out target/wheels-oldest-torch
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall target/wheels-oldest-torch/qlora_rs-*.whl
"$venv/bin/python" -c 'import torch, qlora_rs; print(f"torch {torch.__version__}, qlora_rs from {qlora_rs.__file__}")'
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
