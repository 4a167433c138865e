#!/usr/bin/env bash
# Issue 16's GPU figures in one run, under 5 minutes on one H100/H200:
#   1. benchmarks/bench_batched.py: a correctness check of the batched trainer against the sequential
#      one on this GPU, then samples/s for K = 5, 10, 20 clients of 300 batches each: the plain
#      per-client loop (measured in the same run), the project's sequential trainer, the batched
#      trainer in fp32 without a graph, and with a CUDA graph + bf16, without and with channels_last;
#   2. benchmarks/bench_cuda_graphs.py: GAN training, the eager step against the CUDA-graph step;
#   3. benchmarks/bench_end_to_end.py --repeats 1: the standard preset on Fashion-MNIST (60,000 images)
#      and all three attacks, from empty caches, with the default trainer ('auto' = batched on CUDA).
# Each part has its own time limit, so one that hangs cannot take the other's time.
#
#   bash benchmarks/bench_gpu.sh            # on a GPU
#   bash benchmarks/bench_gpu.sh --quick    # a small bench_batched run that works on CPU (no end-to-end)
set -uo pipefail
PY=${PYTHON:-python3}  # the GPU machines have python3 only
cd "$(dirname "$0")/.."
FASHION=${FASHION:-../shared/data/fashion-mnist}

date -u '+%Y-%m-%d %H:%M UTC'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'
$PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())'

if [[ "${1:-}" == "--quick" ]]; then
    timeout 600 $PY benchmarks/bench_batched.py --quick
    exit $?
fi
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo 'error: no CUDA device here; run with --quick for the CPU check' >&2
    exit 1
fi

status=0
echo; echo '== local training, samples/s (bench_batched.py) =='
timeout 130 $PY benchmarks/bench_batched.py --clients 5 10 20 --steps 300 --repeats 3 || status=$?
echo; echo '== GAN training, eager vs CUDA graph (bench_cuda_graphs.py) =='
timeout 90 $PY benchmarks/bench_cuda_graphs.py --steps 400 --repeats 2 || status=$?
echo; echo "== whole pipeline, standard preset on $FASHION (bench_end_to_end.py --repeats 1) =="
timeout 160 $PY benchmarks/bench_end_to_end.py --repeats 1 --data-dir "$FASHION" --dataset fashion-mnist || status=$?
exit $status
