#!/usr/bin/env bash
# End-to-end demo: build SmolLM2-135M-Instruct, quantize it with GPTQ (4-bit, group 128, asym),
# inspect the result and compare its perplexity with the original.
#
# Usage: bash scripts/demo.sh [WORKDIR]     (default ./demo-out; PYTHON=... picks the interpreter)
# Needs: quantize-llm on PATH (pip install -e .[demo]), which also brings the gguf package.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-demo-out}"
PYTHON="${PYTHON:-python3}"

if ! command -v quantize-llm >/dev/null 2>&1; then
    echo "error: quantize-llm is not on PATH; install the project first: pip install -e '.[demo]'" >&2
    exit 1
fi
mkdir -p "$WORK"

MODEL="$("$PYTHON" "$ROOT/scripts/build_smollm2.py" "$WORK/SmolLM2-135M-Instruct" | tail -n 1)"
QUANT="$WORK/smol-gptq-w4g128"
# Calibration: 64 C4 validation documents of 512 tokens where the shared data folder exists
# (BENCHMARKS.md protocol Q); otherwise 32 sequences of 256 tokens the model writes itself, which
# needs no data at all and keeps the first run to minutes on a laptop CPU (writing the text takes
# one forward pass per token; the progress shows it).
CALIB="$(dirname "$ROOT")/shared/data/c4/c4_validation_2k.parquet"
if [[ -f "$CALIB" ]]; then
    SAMPLES=(--dataset "$CALIB" --nsamples 64 --seqlen 512)
else
    SAMPLES=(--dataset self --nsamples 32 --seqlen 256)
fi
quantize-llm gptq "$MODEL" -o "$QUANT" --bits 4 --group-size 128 --asym --overwrite "${SAMPLES[@]}"
quantize-llm inspect "$QUANT"

# WikiText-2 test split where the shared data folder exists (40 windows of 512 tokens, the protocol);
# otherwise 16 windows of Python's own documentation (its text, hence the figures, vary with the
# Python version).
TEXT="$(dirname "$ROOT")/shared/data/wikitext-2-raw/wiki.test.raw"
if [[ -f "$TEXT" ]]; then
    echo "evaluation text: WikiText-2 test split ($TEXT)" >&2
    WINDOWS=40
else
    TEXT="$WORK/eval.txt"
    "$PYTHON" -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics.values()))" > "$TEXT"
    echo "evaluation text: Python's pydoc topics ($TEXT); WikiText-2 not found" >&2
    WINDOWS=16
fi
quantize-llm eval "$QUANT" --dataset "$TEXT" --windows "$WINDOWS" --baseline "$MODEL"
