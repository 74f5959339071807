#!/usr/bin/env bash
# make demo: answer a text, an image and a spoken question with the `cpu` preset, fully offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUNS=${TRIMODAL_RUNS:-runs/demo}
step() { printf '\n== %s\n' "$*"; }

step "1/4 synthetic shapes set (held-out images are never trained on)"
$PY jobs/make_shapes.py --out "$RUNS/shapes" --train 2000 --val 200 --seed 0
IMAGE=$(ls "$RUNS"/shapes/val2017/*.png | head -n 1)
AUDIO=assets/what_color.wav

RUN_ARGS=()
if [ -f "$RUNS/finetune/final/run.json" ]; then RUN_ARGS=(--run "$RUNS/finetune/final"); fi

step "2/4 text question"
$PY -m trimodal ask --preset cpu "${RUN_ARGS[@]}" --max-tokens 40 "What is the capital of France? Answer in one sentence."

step "3/4 image question ($IMAGE)"
$PY -m trimodal ask --preset cpu "${RUN_ARGS[@]}" --max-tokens 40 --image "$IMAGE" "What shape is in the image?"

step "4/4 spoken question ($AUDIO) about the same image"
$PY -m trimodal ask --preset cpu "${RUN_ARGS[@]}" --max-tokens 40 --image "$IMAGE" --audio "$AUDIO"
