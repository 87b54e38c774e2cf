#!/usr/bin/env bash
# Everything a lent GPU machine should measure, in one call of at most ~8.5 minutes (plus the
# machine's start), most important first; each step has its own time limit, and its output goes
# to $OUT (or benchmarks/out/). Cold max-autotune compiles take about a minute per graph.
#
#   bash benchmarks/gpu_session.sh
#
# The machine is offline: its own python3 with PyTorch runs the checkout; pydantic travels as
# wheels in .whl/ (see benchmarks/RESULTS.md, GPU section).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
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
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
step 60 cuda-tests python3 -m pytest -q -x -p no:cacheprovider tests/test_inference_cuda.py
step 240 bench python3 benchmarks/gpu_bench.py --graphs --compile --batches 1,32,128 --budget-s 220
step 45 layers python3 benchmarks/gpu_layers.py --batch 128 --conv1 3,8
step 150 variants python3 benchmarks/gpu_variants.py --modes max-autotune-no-cudagraphs --conv1 3,8 --batches 128
