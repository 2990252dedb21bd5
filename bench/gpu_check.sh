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

T0=$(date +%s)
log "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/gpu_check.log"
if [ -d bench/.wheels ]; then
  $PY -m pip install -q --no-deps --no-index bench/.wheels/*.whl 2>&1 | tail -2 | tee -a "$OUT/gpu_check.log"
else
  log "no bench/.wheels: the MLCD peers (liger-kernel, cut-cross-entropy) are skipped unless the image has them (make gpu-wheels here, then carry bench/.wheels)"
fi

log "build"
t0=$(date +%s)
MAX_JOBS=16 timeout 300 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
log "build rc=$? in $(( $(date +%s) - t0 ))s"

log "tests on CUDA"
# Every failure is listed (no -x: one GPU run has to show all of them). On CUDA most of the time
# is Triton compiling each kernel specialisation once: pytest-xdist (in the image) spreads that
# over 8 processes; each holds its own CUDA context (~0.5 GB).
TIMEOUT_OPT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
XDIST_OPT=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 240 $PY -m pytest -q -rfE $XDIST_OPT $TIMEOUT_OPT tests -p no:cacheprovider > "$OUT/tests.log" 2>&1
log "tests rc=$?: $(tail -1 "$OUT/tests.log")"

# Every later step gets at most what is left of the budget (and is skipped under 30 s), so the
# whole script stays under 8 minutes whatever a step costs.
BUDGET=${BUDGET:-460}
step() {  # step NAME MAX_SECONDS LOGFILE command...
  local name=$1 max=$2 logf=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 30 ]; then log "$name skipped: time budget"; return; fi
  [ "$max" -gt "$left" ] && max=$left
  timeout "$max" "$@" >> "$logf" 2>&1
  log "$name rc=$?"
  cp bench/results/*.json bench/results/*.md "$OUT"/ 2>/dev/null
}

step "bench (GPU cases)" 200 "$OUT/bench.log" $PY -m bench --cases mlcd_1m_sampled,mlcd_1m_full,knn_gpu,noise_imagenet
step "bench homattn" 120 "$OUT/bench_attn.log" $PY -m bench --cases homattn_vitb,homattn_long
# Triton tile variants of the attention (kernels/homologous_attention.py, PYSSL_HOMATTN_TRITON)
for variant in "st3:num_stages=3" "fwd128:fwd.BLOCK_M=128,fwd.num_warps=8,fwd.num_stages=3"; do
  tag=${variant%%:*}
  step "homattn $tag" 45 "$OUT/bench_attn.log" env PYSSL_HOMATTN_TRITON=${variant#*:} \
    $PY -m bench --cases homattn_vitb,homattn_long --impls pyssl-triton --tag "$tag" --no-memory
done
# certification of 4 ImageNet images with a ResNet-50 runs ~40k forwards per impl: no memory pass
step "bench certify_resnet" 120 "$OUT/bench_certify.log" $PY -m bench --cases certify_resnet --no-memory

# Triton backward configurations for MLCD (kernels/mlcd_loss.py, PYSSL_MLCD_TRITON_BWD), each
# recorded as "pyssl-triton[tag]" beside the default, while the budget lasts.
for variant in "bwd256:BLOCK_DO=256,num_stages=3" "dxs1:DX_SPLITS=1" "dxs4:DX_SPLITS=4" "nocut:CUT_CHAIN=0"; do
  tag=${variant%%:*}
  step "sweep $tag" 60 "$OUT/bench_sweep.log" env PYSSL_MLCD_TRITON_BWD=${variant#*:} \
    $PY -m bench --cases mlcd_1m_sampled,mlcd_1m_full --impls pyssl-triton --tag "$tag" --no-memory
done
log "done in $(( $(date +%s) - T0 ))s"
