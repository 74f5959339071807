#!/usr/bin/env bash
# make jobs: the training pipeline as Ray jobs on a local, token-authenticated Ray head bound to 127.0.0.1,
# submitted exactly as a user submits them to a cluster:
#   ray job submit --no-wait --working-dir . --runtime-env-json '{...}' -- python jobs/<job>.py ...
#   ray job logs --follow <id>;  ray job status <id>
# Jobs: stage 0 (tiny CLIP), preprocess (Ray Data), stage 1 (pretrain), stage 2 (finetune). Works from a clean
# clone (installs first) and re-runs safely (training jobs pass --resume; preprocessing overwrites its tables).
#
#   make jobs                                              # `cpu` preset, the preset's step counts
#   PRESET=test STEPS0=2 STEPS1=2 STEPS2=2 make jobs       # smoke test: tiny random models, a few minutes
#
# Environment: as in scripts/common.sh (PRESET, STEPS0/1/2, SHAPES_TRAIN/VAL, RAY_PORT, DASHBOARD_PORT,
# RAY_START_ARGS), and RUNS [runs/jobs-$PRESET]; FRESH=1 deletes RUNS first.
# The head is left running (dashboard: http://127.0.0.1:$DASHBOARD_PORT); `make demo-stop` stops it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"

printf '== install\n'
make --no-print-directory install

RUNS=$(abspath "${RUNS:-runs/jobs-$PRESET}")   # absolute: each job runs in an uploaded copy of the working dir
REPORT="$RUNS/jobs.txt"
if [ "${FRESH:-0}" = 1 ]; then rm -rf "$RUNS"; fi
mkdir -p "$RUNS"
: > "$REPORT"
read_preset_defaults

summary() {
  printf '\n== jobs (%s, preset %s)\n%-10s %-44s %-10s %7s\n' "$ADDRESS" "$PRESET" job "submission id" status time
  cat "$REPORT"
}
trap 'summary' EXIT

T_START=$SECONDS
printf '\n== local Ray head (token auth, 127.0.0.1)\n'
start_head

printf '\n== synthetic shapes set (%s train / %s val images)\n' "$SHAPES_TRAIN" "$SHAPES_VAL"
python jobs/make_shapes.py --out "$RUNS/shapes" --train "$SHAPES_TRAIN" --val "$SHAPES_VAL" --seed "$SHAPES_SEED"

printf '\n== job check\n'
# The python the cluster runs jobs with, and the trimodal it imports (the submitted one, via py_modules).
submit_job check python -c "import sys, trimodal; print('job python:', sys.executable); print('trimodal from:', trimodal.__file__)"
printf '\n== job stage0\n'
# shellcheck disable=SC2046  # $(steps ...) is zero or two words
submit_job stage0 python jobs/train_clip.py --preset "$PRESET" --coco-root "$RUNS/shapes" --out "$RUNS/clip" --resume \
    $(steps "${STEPS0:-}")
printf '\n== job preprocess\n'
submit_job preprocess python jobs/preprocess.py --preset "$PRESET" --coco-root "$RUNS/shapes" \
    --vision "$RUNS/clip/tower" --instruct "$RUNS/shapes/llava_instruct.json" \
    --instruct "$RUNS/shapes/llava_instruct_val.json" --out "$RUNS/data"
printf '\n== job pretrain\n'
# shellcheck disable=SC2046
submit_job pretrain python jobs/pretrain.py --preset "$PRESET" --data "$RUNS/data" --out "$RUNS/pretrain" --resume \
    $(steps "${STEPS1:-}")
printf '\n== job finetune\n'
# shellcheck disable=SC2046
submit_job finetune python jobs/finetune.py --preset "$PRESET" --data "$RUNS/data" --init "$RUNS/pretrain" \
    --out "$RUNS/finetune" --resume $(steps "${STEPS2:-}")

trap - EXIT
summary
cat <<MSG

All jobs succeeded in $((SECONDS - T_START)) s. Outputs under $RUNS (the finished model: $RUNS/finetune/final).
  Evaluate:   python jobs/evaluate.py --run $RUNS/finetune --data $RUNS/data
  Dashboard:  $ADDRESS   (the head keeps running; stop it with: make demo-stop)
MSG
