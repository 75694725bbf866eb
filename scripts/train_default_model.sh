#!/usr/bin/env bash
# Retrain the model shipped in cpuflow/models/default, from nothing, as it was made:
#   1. v1 from scratch (VAE, CLIP tokenizer + text encoder, UNet): 40-minute budget
#   2. v4: v1 distilled for guidance 5 (paired guidance distillation, 1500 steps, ~19 min)
#   3. export both formats + int8 variants into cpuflow/models/default (about 1 min)
# About an hour on a 2-core CPU; needs the export extra (bash scripts/setup-dev.sh).
# Step 1's schedule is fitted to its time budget on slower machines (logged), so a slower
# machine trains fewer steps; steps 2-3 are step-for-step reproducible.
# Details and accuracy tables: bench/default_model_training.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" export/train_default.py --out .cache/default-model --minutes 40 --seed 0
"$PY" export/train_default.py --init-from .cache/default-model --out .cache/default-model-v4 --seed 0 \
    --unet-steps 1500 --unet-batch 16 --unet-lr 3e-4 --unet-warmup 100 \
    --guidance-distill 2.5 --distill-pair-guidance 5 --minutes 40
"$PY" scripts/build_default_model.py .cache/default-model-v4 --quantize int8 --quantize int8-weights
"$PY" bench/eval_default_model.py --guidance 5 --backend openvino --backend onnxruntime
