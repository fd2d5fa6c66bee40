#!/usr/bin/env bash
# Runs the prepared GPU check on the device machine (one NVIDIA GPU, no Rust, no network).
#
# Here, once per run (builds the abi3 wheel WITH kernels and fetches the bitsandbytes wheel into .whl/):
#     bash ../shared/tools/device-prep.sh
# Then one call of the `device` tool's run, carrying the wheels:
#     run(command="bash benches/run_gpu_check.sh", carry=[".whl"], timeout_s=480)
# It installs only the carried wheels (the command from device-prep.sh), runs benches/gpu_check.py
# (correctness + speed; at most GPU_CHECK_BUDGET_S=240 seconds) and every GPU-marked pytest test
# (kernels, Linear4bit, managed memory and the paged optimizers, training), and leaves
# gpu_check.json, gpu_check.md, pytest.xml and the logs under $OUT.
# Nothing is compiled there: a wheel without kernels is reported as such by the first check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || { echo "installing the carried wheels from .whl/ failed" >&2; exit 3; }
# At most 8 files come back from $OUT: gpu_check.{json,md,log}, pytest.{xml,log}, and the plug-ins' own.
{ nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv 2>&1
  python3 benches/gpu_check.py --out "$OUT" --budget-s "${GPU_CHECK_BUDGET_S:-240}" "$@" 2>&1; } | tee "$OUT/gpu_check.log"
check_rc=${PIPESTATUS[0]}
# -W default: the image's other package versions may warn at import; show it there, do not fail on it.
timeout "${GPU_PYTEST_TIMEOUT_S:-180}" python3 -m pytest -q -p no:cacheprovider -W default -m gpu tests \
  --junitxml="$OUT/pytest.xml" 2>&1 | tail -n 40 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "gpu_check exit ${check_rc}, pytest exit ${test_rc}"
exit $(( check_rc != 0 || test_rc != 0 ))
