#!/usr/bin/env bash
# Everything a lent GPU machine should measure, in one call of at most ~7.7 minutes (plus the
# machine's start), most important first; each step has its own time limit, and its output goes
# to $OUT (or benchmarks/out/).
#
#   bash benchmarks/gpu_wheels.sh      # here, once: the packages the machine lacks, into .whl/
#   bash benchmarks/gpu_session.sh     # there, in one call (see benchmarks/RESULTS.md, 'GPU end to end')
#
# The machine is offline: its own python3 with PyTorch runs the checkout; pydantic, PyAV and
# PyNvVideoCodec travel in .whl/gpu-site.tar.xz (or as wheels in .whl/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if [ -f .whl/gpu-site.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .whl/gpu-site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
elif ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 STREAMDET_CACHE_DIR=/tmp/streamdet-cache
step() {  # step SECONDS NAME COMMAND...: run with a limit, keep the output, never stop the session
    local limit=$1 name=$2
    shift 2
    echo "## $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | grep -v '^USDT:' | tee "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv,noheader
# NVDEC first: a small clip through NvdecSource against PyAV, or what of the API to fix.
step 30 nvdec-probe python3 benchmarks/gpu_nvdec_probe.py
# CUDA tests: the engine's, NVDEC's frames and the device path against the CPU path's.
step 75 cuda-tests python3 -m pytest -q -x -p no:cacheprovider tests/test_inference_cuda.py tests/test_gpu_cuda.py
# The whole pipeline, decode gpu: N synthetic 1080p30 H.264 streams at stride 8, the N it holds
# and where the time goes. The default (eager) engine: decoding, not the model, bounds N.
step 180 pipeline python3 benchmarks/gpu_pipeline.py --budget-s 130 --start 64 --json "$out/pipeline.json"
# The engine as `streamdet run` builds it, at the varying batch sizes a run gives it: the
# default engine, then the compiled one (model.compile: true; a cold compile takes minutes).
step 170 engine-batches python3 benchmarks/gpu_engine_batches.py --rounds 3
