#!/usr/bin/env bash
# One command on a CUDA machine with PyTorch: correctness against fp32 first, then clips/s at
# batch 1..128, TFLOP/s against the card's bf16 peak, and the implied 30 fps stream count.
# Finishes in under 5 minutes (batch sizes stop being added after --budget-s, default 200 s).
#
#   bash benchmarks/gpu_bench.sh              # fp32 / bf16 / fp16
#   bash benchmarks/gpu_bench.sh --graphs     # also bf16 with CUDA graphs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to PyTorch')"
# No install needed (GPU machines are often offline): run from the checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
exec timeout 290 "$PY" benchmarks/gpu_bench.py "$@"
