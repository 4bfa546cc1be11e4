#!/usr/bin/env bash
# On a lent GPU machine, in one device call per stage: build the CUDA engine there, then
#   bash bench/gpu_check.sh core    GPU tests + bench/bench_gpu.py (per-matrix engine, Mistral-7B end to end)
#                                   (timeout_s ~540: build ~1 min, tests ~1 min, bench ~4 min)
#   bash bench/gpu_check.sh scale   bench/bench_scale.py on Qwen1.5-110B and Llama-3.1-405B shapes + the
#                                   freeze-memory bench on the GPU (timeout_s ~540)
# Everything is left under $OUT (results JSON + logs; at most 8 files come back) to be committed under
# bench/results/.
set -uo pipefail
STAGE=${1:-core}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
{
  echo "stage $STAGE commit $commit"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1; $PY -c "import torch; print('torch', torch.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# The wheels' cuSOLVER/cuBLAS are found by setup.py; no network there, so no build isolation.
SPECTRUM_FAST_CUDA=1 timeout 240 $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"
$PY -m spectrum_fast | tee -a "$OUT/env.txt"
case "$STAGE" in
  core)
    timeout 180 $PY -m pytest -q -rs tests/test_native.py tests/test_cpu_engine.py -p no:cacheprovider 2>&1 \
      | tail -30 | tee "$OUT/tests.log"
    GIT_COMMIT=$commit timeout 360 $PY bench/bench_gpu.py --json "$OUT/gpu_check.json" 2>&1 | tail -40 | tee "$OUT/bench.log"
    ;;
  scale)
    timeout 360 $PY bench/bench_scale.py --device cuda --models Qwen1.5-110B Llama-3.1-405B --samples 2 \
      --workdir /tmp/sf_scale --json "$OUT/scale_gpu.json" 2>&1 | grep -v '^writing' | tail -40 | tee "$OUT/scale.log"
    timeout 120 $PY bench/bench_freeze_memory.py --device cuda --json "$OUT/freeze_memory_gpu.json" 2>&1 | tail -8 \
      | tee "$OUT/freeze.log"
    ;;
  *) echo "unknown stage $STAGE (core|scale)"; exit 2 ;;
esac
echo "results in $OUT"
