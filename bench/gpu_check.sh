#!/usr/bin/env bash
# On a lent GPU machine (the whole session has 15 device minutes, at most 10 per call; a machine starts in ~30 s):
#   BUDGET=500 bash bench/gpu_check.sh core   (timeout_s ~520; ~300-440 s of work)
#   BUDGET=B bash bench/gpu_check.sh scale    (B = the device status's budget_left_s minus ~25, at most ~300;
#                                              timeout_s = B + 15: a step's kill grace is 10 s. Call it at
#                                              once: a machine idle for 30 s is given back, and a fresh one
#                                              rebuilds and re-measures the two-stage rates first)
# The machine's start counts against the session's 15 device minutes too, so `core` is kept near 500 s.
#   bash bench/gpu_check.sh all      (both, cut at BUDGET)
# builds the CUDA engine there (skipped when the same sources already import), then, each step bounded by
# what is left of BUDGET seconds (default 540; GPU_PARTS picks bench_gpu.py's parts, SCALE_MODELS the
# scale bench's models, GUARD=1 adds bench_guard.py):
#   core:  GPU tests (tests/test_native.py, test_cuda_orchestration.py, test_band_solver.py, test_twostage.py);
#          bench/bench_gpu.py --parts syevd,e2e (cuSOLVER's Xsyevd algorithms per k, default / one-stage /
#          two-stage, the fastest accurate one then used by every scan after it through
#          SPECTRUM_FAST_SYEVD_ALG; the Mistral-7B-shaped scan end to end: the syevd route with that algorithm
#          and with the default, torch loops, reference, then the band-solver route last, so that a failure
#          there cannot cost the other numbers; GPU_PARTS=syevd,matrix,batched,e2e for everything);
#          bench/bench_twostage.py (our GPU two-stage solver: batched band reduction, native panel QR and
#          band solver, against Dsyevd at k = 4096, 8192, 16384; every chase variant at 4096, the fastest
#          then used by the scans below through SPECTRUM_FAST_CHASE)
#   scale: bench/bench_scale.py --e2e on Qwen1.5-110B and Llama-3.1-405B shapes on the float64 route that was
#          faster per matrix at the largest k (gpu_summary.py --route: our band solver, SPECTRUM_FAST_TWOSTAGE=gpu,
#          its sampled shapes corrected by bench_twostage's rates; or Xsyevd with the chosen algorithm), and the
#          generated layer scanned again twice over (SCALE_COPIES=2): the whole-model estimate at the rate a
#          running scan adds bytes, start and last launch paid once (~20 s more); then
#          bench/sanitize_band.py under compute-sanitizer's memcheck, racecheck and synccheck (35 s each: the
#          band solver's kernels on small bands, every variant). Run it right after `core`, on the same warm
#          machine (it is released after 30 s idle), so that neither the build nor bench_twostage repeats.
# A failing step does not stop the next. Everything is left under $OUT (at most 8 files come back):
# env.txt (with the build log and a fingerprint of the sources: the device's .git can be stale) tests.log
# bench.log twostage_gpu.json gpu_check.json sanitize.log scale.log scale_gpu.json; commit the JSONs under
# bench/results/ and the figures in bench/NOTES-gpu.md.
set -uo pipefail
export LC_ALL=C  # the sources' fingerprint below globs files: one collation order everywhere
STAGE=${1:-all}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${BUDGET:-540} - 20))  # the last 20 s: a step's kill grace and the summary
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)

# step CAP LOG CMD...: run CMD for at most min(CAP, seconds left), output appended to $OUT/LOG and shown;
# returns CMD's exit status (0 when skipped)
step() {
  local cap=$1 log=$2; shift 2
  local left=$((DEADLINE - SECONDS)); ((left < cap)) && cap=$left
  if ((cap < 10)); then echo "SKIPPED (time budget spent): $*" | tee -a "$OUT/$log"; return 0; fi
  echo "== $* (limit ${cap} s)" | tee -a "$OUT/$log"
  local t0=$SECONDS
  timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "== rc $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$log"
  return "$rc"
}

# use_setting VAR JSON EXPR WHAT: export VAR=EXPR(doc) for the scans after it, EXPR evaluated on JSON's
# contents as `doc` in Python, unless VAR is set already or EXPR gives nothing ('')
use_setting() {
  local var=$1 json=$2 expr=$3 what=$4 value
  value=$($PY -c "import json; doc = json.load(open('$json')); print($expr)" 2>/dev/null)
  if [[ -n $value && -z ${!var:-} ]]; then
    export "$var=$value"
    echo "$var=$value ($what)" | tee -a "$OUT/env.txt"
  fi
}
# the chase variant bench_twostage.py found fastest at the engine's bandwidth
use_best_chase() { use_setting SPECTRUM_FAST_CHASE /tmp/sf_twostage.json "doc.get('best_variant', '')" "fastest in bench_twostage.py"; }
# the Xsyevd algorithm bench_gpu.py's syevd part chose (cuSOLVER 12.3.4+)
# ('0', cuSOLVER's default, is what an unset SPECTRUM_FAST_SYEVD_ALG means already)
use_best_syevd() {
  use_setting SPECTRUM_FAST_SYEVD_ALG /tmp/sf_gpu_check.json \
    "(lambda c: '' if c == '0' else c)(doc['syevd'].get('choice', '0'))" "chosen by bench_gpu.py's syevd part"
}

sources=$(cat csrc/* spectrum_fast/*.py bench/*.py setup.py CMakeLists.txt | sha1sum | cut -c1-12)
native=$(cat csrc/* setup.py CMakeLists.txt | sha1sum | cut -c1-12)  # what the build depends on
export SF_SOURCES=$sources  # the bench JSONs record it: the device's .git can be stale
{
  echo "stage $STAGE commit $commit sources $sources"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  nvcc --version | tail -1; $PY -c "import torch; print('torch', torch.__version__)"; nproc; free -g | head -2
} 2>&1 | tee "$OUT/env.txt"
# The wheels' cuSOLVER/cuBLAS are found by setup.py; no network there, so no build isolation.
export SPECTRUM_FAST_CUDA=1
if [[ -f /tmp/sf_built && $(cat /tmp/sf_built) == "$native" ]] && timeout 60 $PY -c "import spectrum_fast._C" 2>/dev/null; then
  echo "extension already built from these sources" | tee -a "$OUT/env.txt"
else
  # marked built only if pip succeeded; a failed build stops here (an older extension may still import, and
  # every number after it would be the old kernels')
  if step 200 env.txt $PY -m pip install -v --no-build-isolation --no-deps -e . >/dev/null; then
    echo "$native" >/tmp/sf_built
  else
    echo "the extension did not build (env.txt has the log)" | tee -a "$OUT/env.txt"; exit 1
  fi
fi
timeout 60 $PY -m spectrum_fast 2>&1 | tee -a "$OUT/env.txt"
if ! timeout 60 $PY -c "import spectrum_fast._C" 2>>"$OUT/env.txt"; then echo "the extension did not build or import"; exit 1; fi

if [[ $STAGE == all || $STAGE == core ]]; then
  # warnings stay warnings here: the device's newer torch/transformers may deprecate things the CPU CI pins
  step 150 tests.log $PY -m pytest -q -rfEs -p no:cacheprovider -W ignore::DeprecationWarning -W ignore::FutureWarning \
    tests/test_native.py tests/test_cuda_orchestration.py tests/test_band_solver.py tests/test_twostage.py
  GIT_COMMIT=$commit; export GIT_COMMIT
  if [[ ${GUARD:-0} == 1 ]]; then
    step 60 bench.log $PY bench/bench_guard.py --device cuda --sizes 1024 4096 8192 --json "$OUT/guard_gpu.json"
  fi
  # cuSOLVER's own Xsyevd algorithms first, the Mistral-shaped scan with the fastest of them (its band-solver
  # scan last, with the default chase variant); then our band solver's rates. On a fresh machine the two-stage
  # floors of the Mistral scan are then missing (its rates come after it): the Mistral numbers, which decide
  # the issue, come first; `scale` measures the rates it needs if this step is cut
  step 300 bench.log $PY bench/bench_gpu.py --parts "${GPU_PARTS:-syevd,e2e}" --twostage /tmp/sf_twostage.json \
    --json "$OUT/gpu_check.json"
  cp "$OUT/gpu_check.json" /tmp/sf_gpu_check.json 2>/dev/null  # for a later `scale` call on this machine
  step 150 bench.log $PY bench/bench_twostage.py --device cuda --sizes 4096 8192 16384 --bands 32 64 \
    --json "$OUT/twostage_gpu.json"
  cp "$OUT/twostage_gpu.json" /tmp/sf_twostage.json 2>/dev/null  # for a later `scale` call on this machine
fi
if [[ $STAGE == all || $STAGE == scale ]]; then
  if [[ ! -f /tmp/sf_twostage.json ]]; then  # a fresh machine: only what the scale bench needs
    step 100 scale.log $PY bench/bench_twostage.py --device cuda --sizes 8192 16384 --bands 32 --variants 7 \
      --per-sm --json "$OUT/twostage_gpu.json"
    cp "$OUT/twostage_gpu.json" /tmp/sf_twostage.json 2>/dev/null
  fi
  if [[ ! -f /tmp/sf_gpu_check.json ]]; then  # a fresh machine: cuSOLVER's algorithms at the scale sizes
    step 80 scale.log $PY bench/bench_gpu.py --parts syevd --syevd-sizes 8192,16384 --json /tmp/sf_gpu_check.json
  fi
  use_best_chase
  use_best_syevd
  # the float64 route that was faster per matrix at the largest k: the band solver (gpu) or Xsyevd (0)
  route=$($PY bench/gpu_summary.py --route /tmp/sf_gpu_check.json /tmp/sf_twostage.json 2>/dev/null || echo gpu)
  echo "scale route: SPECTRUM_FAST_TWOSTAGE=$route" | tee -a "$OUT/scale.log"
  # the scale bench, leaving SANITIZE_S (default 105) seconds for the sanitizers after it
  left=$((DEADLINE - SECONDS - ${SANITIZE_S:-105}))
  step $((left < 220 ? left : 220)) scale.log env SPECTRUM_FAST_TWOSTAGE="$route" $PY bench/bench_scale.py --device cuda \
    --models ${SCALE_MODELS:-Qwen1.5-110B Llama-3.1-405B} --samples 2 --workdir /tmp/sf_scale --e2e \
    --e2e-copies "${SCALE_COPIES:-2}" \
    --twostage /tmp/sf_twostage.json --json "$OUT/scale_gpu.json"
  # the band solver's kernels under compute-sanitizer (out-of-bounds accesses, shared-memory races, barrier
  # misuse), torch's caching allocator off so that every tensor is its own allocation; each part of
  # sanitize.log ends "ERROR SUMMARY: 0 errors" (racecheck: "RACECHECK SUMMARY: 0 hazards displayed ...") and
  # rc 0 when clean (rc 124 with no summary: out of time, not clean)
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck; do
      step 35 sanitize.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 3 --tool "$tool" \
        $PY bench/sanitize_band.py
    done
  else
    echo "no compute-sanitizer on this machine" | tee -a "$OUT/sanitize.log"
  fi
fi
# the verdicts, for the call's output tail (no file: at most 8 come back)
timeout 30 $PY bench/gpu_summary.py "$OUT"
echo "results in $OUT after $SECONDS s"
