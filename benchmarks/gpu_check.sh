#!/usr/bin/env bash
# The GPU check, in one script: the card, the CUDA tests, the benchmark and a short quickstart in
# bf16. Run it on a CUDA machine with the project installed (`make install`; pip takes the CUDA
# build of torch there), from the repository root:
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default runs/gpu-check, about 10 min on an H100
# It prints every figure and writes them under OUT_DIR; copy the ratios and the quickstart table
# into the README's benchmark section with the card's name.
set -euo pipefail
OUT_DIR=${1:-runs/gpu-check}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
mkdir -p "$OUT_DIR"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bf16', torch.cuda.is_bf16_supported())"
} | tee "$OUT_DIR/machine.txt"
# CUDA path: the update equals CPU's, bf16 weights restored bit-exactly, autocast on all passes.
"$PY" -m pytest -q tests/test_cuda.py tests/test_precision.py tests/test_booster_step.py 2>&1 | tee "$OUT_DIR/tests.txt"
# Benchmark: SFT vs Booster step time and peak CUDA memory (bf16), batched vs sequential generation.
"$PY" benchmarks/step_time.py --out "$OUT_DIR/step_time.json" --batch 10 --length 256 --warmup 3 --steps 10
"$PY" benchmarks/generation_speed.py --out "$OUT_DIR/generation.json" --prompts 80 --max-new-tokens 128 --batch-size 40
# Evaluation on the GPU: the evaluated model's parameters (and the judge's) must be on it; one
# evaluation of 80 prompts timed (prompts/s), with the batch size found by halving on out-of-memory.
"$PY" benchmarks/eval_check.py --model embedded --judge embedded --prompts 80 --max-new-tokens 128 \
  --batch-size auto --require-cuda --out "$OUT_DIR/eval_check.json" 2>&1 | tee "$OUT_DIR/eval_check.txt"
"$PY" benchmarks/eval_check.py --model embedded --judge embedded --prompts 80 --max-new-tokens 128 \
  --batch-size auto --bf16 --require-cuda --out "$OUT_DIR/eval_check_bf16.json" 2>&1 | tee "$OUT_DIR/eval_check_bf16.txt"
# The cost estimate the dry run prints, for comparison with the measured step times above.
"$PY" -m booster run --config configs/quickstart.yaml --dry-run --output-dir "$OUT_DIR/dry-run" --no-progress \
  2>&1 | sed -n '/^  cost on one GPU/,/^  (tokens/p' | tee "$OUT_DIR/cost_estimate.txt"
# A short quickstart in bf16 on the GPU (same settings as the CPU one).
"$PY" -m booster run --config configs/quickstart.yaml --output-dir "$OUT_DIR/quickstart" \
  --set align.bf16=true --set attack.bf16=true 2>&1 | tail -n 40 | tee "$OUT_DIR/quickstart.txt"
cat "$OUT_DIR/quickstart/report.md" | head -n 20
