#!/usr/bin/env bash
# Everything the CUDA work needs checked on a GPU machine, in one go: the kernel status, the
# `cuda`-marked tests (kernels against the PyTorch op, loader, several workers on the GPU), then
# BENCHMARKS.md protocol K and end-to-end generation (scripts/bench_kernel.py). Full logs go to
# $OUT (default ./gpu-check); the end of each is printed.
#
#   bash scripts/gpu_check.sh                   # with the project installed, or from a checkout
#   BENCH_ARGS="--settings w4g128 --batches 1 16" bash scripts/gpu_check.sh   # a shorter benchmark
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export QUANTIZE_LLM_CACHE="$OUT/cache"
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -m quantize_llm env 2>&1 | tee "$OUT/env.txt"
$PY -m pytest -q -p no:cacheprovider -m cuda tests/runtime/test_cuda.py tests/test_devices.py \
    > "$OUT/pytest-cuda.txt" 2>&1
echo "pytest (cuda) exit $?"; tail -n 25 "$OUT/pytest-cuda.txt"
$PY scripts/bench_kernel.py --generate --json "$OUT/bench.json" \
    ${BENCH_ARGS:---settings w4g128 w4g128-asym w4g128-actorder w8g128 nf4-b64} > "$OUT/bench.txt" 2>&1
echo "bench exit $?"; tail -n 60 "$OUT/bench.txt"
