#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA engine there, run the GPU tests and the GPU benchmark,
# and leave everything under $OUT (results JSON + logs) to be committed under bench/results/.
#   device run:  bash bench/gpu_check.sh      (timeout_s ~540; builds in ~1 min, tests ~1 min, bench ~4 min)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
{
  echo "commit $commit"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1; $PY -c "import torch; print('torch', torch.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# The wheels' cuSOLVER/cuBLAS are found by setup.py; no network there, so no build isolation.
SPECTRUM_FAST_CUDA=1 timeout 240 $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"
$PY -m spectrum_fast | tee -a "$OUT/env.txt"
timeout 180 $PY -m pytest -q -rs tests/test_native.py tests/test_cpu_engine.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/tests.log"
GIT_COMMIT=$commit timeout 300 $PY bench/bench_gpu.py --json "$OUT/gpu_check.json" 2>&1 | tail -40 | tee "$OUT/bench.log"
timeout 150 $PY bench/bench_freeze_memory.py --device cuda --json "$OUT/freeze_memory_gpu.json" 2>&1 | tail -8 | tee "$OUT/freeze.log"
echo "results in $OUT"
