#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (torch + triton + nvcc preinstalled, no network).
# In under 8 minutes: build the package there, run the test suite on CUDA (every backend against
# the reference, real Triton, real CUDA kernels), then the GPU benchmark cases; everything it
# measures lands in $OUT (and bench/results/ on that copy of the tree).
#
#   device: bash bench/gpu_check.sh          (OUT defaults to bench/results/gpu_run)
# Peers that are not in the image (liger-kernel, cut-cross-entropy) install from wheels in
# bench/.wheels/ if present: `make gpu-wheels` fetches them here; carry that folder along.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/gpu_check.log"
if [ -d bench/.wheels ]; then
  $PY -m pip install -q --no-deps --no-index bench/.wheels/*.whl 2>&1 | tail -2 | tee -a "$OUT/gpu_check.log"
fi

log "build"
t0=$(date +%s)
MAX_JOBS=16 timeout 300 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
log "build rc=$? in $(( $(date +%s) - t0 ))s"

log "tests on CUDA"
timeout 240 $PY -m pytest -q -x --timeout 120 tests -p no:cacheprovider > "$OUT/tests.log" 2>&1
log "tests rc=$?: $(tail -1 "$OUT/tests.log")"

log "bench (GPU cases)"
timeout 300 $PY -m bench --cases mlcd_1m_sampled,mlcd_1m_full > "$OUT/bench.log" 2>&1
log "bench rc=$?"
cp bench/results/*.json bench/results/*.md "$OUT"/ 2>/dev/null
log "done"
