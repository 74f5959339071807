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
# Environment (defaults in brackets):
#   PRESET [cpu]  RUNS [runs/jobs-$PRESET]  FRESH=1 deletes RUNS first
#   STEPS0 STEPS1 STEPS2 [the preset's]     steps of stage 0 / 1 / 2
#   SHAPES_TRAIN SHAPES_VAL [the preset's]  size of the synthetic shapes set
#   RAY_PORT [6379]  DASHBOARD_PORT [8265]  the head's GCS and dashboard / job API ports
#   RAY_START_ARGS                          extra `ray start` flags for a new head (e.g. --temp-dir=..., ports)
# The head is left running (dashboard: http://127.0.0.1:$DASHBOARD_PORT); `make demo-stop` (or `ray stop`) stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"
export RAY_AUTH_MODE=token            # token authentication stays on (token: ~/.ray/auth_token)

PRESET=${PRESET:-cpu}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"

printf '== install\n'
make --no-print-directory install

abspath() { python -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$1"; }
RUNS=$(abspath "${RUNS:-runs/jobs-$PRESET}")   # absolute: each job runs in an uploaded copy of the working dir
REPORT="$RUNS/jobs.txt"

if [ "${FRESH:-0}" = 1 ]; then rm -rf "$RUNS"; fi
mkdir -p "$RUNS"
: > "$REPORT"

# --- the preset's defaults --------------------------------------------------------------------------------------
read -r DEF_TRAIN DEF_VAL DEF_SEED < <(python -c "
from trimodal.config import load_config
d = load_config('$PRESET').data
print(d.shapes_train, d.shapes_val, d.shapes_seed)")
if [ -z "${DEF_SEED:-}" ]; then echo "error: cannot read preset $PRESET" >&2; exit 1; fi
SHAPES_TRAIN=${SHAPES_TRAIN:-$DEF_TRAIN}
SHAPES_VAL=${SHAPES_VAL:-$DEF_VAL}
HUB_OFFLINE=1
if [ "$PRESET" = phi2 ]; then HUB_OFFLINE=0; fi

# What travels with every job: the working dir without the venv, runs and VCS data; the library itself as a
# py_module (so the job runs the code you submitted, not whatever is installed on the node); a few env vars.
RUNTIME_ENV=$(cat <<JSON
{"excludes": [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache"],
 "py_modules": ["platform/trimodal"],
 "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "$HUB_OFFLINE"}}
JSON
)

# --- the head -----------------------------------------------------------------------------------------------------
port_busy() { python -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $1)) != 0)"; }

start_head() {
  if ray status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; then
    echo "   using the Ray head already running on 127.0.0.1:$RAY_PORT"
    return
  fi
  for port in "$RAY_PORT" "$DASHBOARD_PORT"; do
    if port_busy "$port"; then
      echo "error: port $port is taken by something that is not a Ray head we can reach with our token;" \
           "choose others with RAY_PORT=... DASHBOARD_PORT=..." >&2
      exit 1
    fi
  done
  ray get-auth-token --generate >/dev/null   # ~/.ray/auth_token, kept if it exists (never printed)
  local cpus; cpus=$(python -c 'import os; print(os.cpu_count())')
  # shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
  ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --dashboard-host=127.0.0.1 \
      --dashboard-port="$DASHBOARD_PORT" --num-cpus="$cpus" --disable-usage-stats ${RAY_START_ARGS:-} >/dev/null
  echo "   started a Ray head: GCS 127.0.0.1:$RAY_PORT, dashboard and job API $ADDRESS (token auth on)"
}

# --- one job: submit without waiting, follow its logs, then ask for its status -------------------------------------
CURRENT=""
trap 'if [ -n "$CURRENT" ]; then echo; echo "interrupted: job $CURRENT keeps running; stop it with: RAY_AUTH_MODE=token ray job stop --address $ADDRESS $CURRENT" >&2; fi' INT

job() {  # job NAME COMMAND...
  local name=$1; shift
  local id; id="trimodal-$name-$(date +%Y%m%d-%H%M%S)"
  printf '\n== job %s: %s\n' "$name" "$*"
  local t0=$SECONDS
  ray job submit --address "$ADDRESS" --no-wait --submission-id "$id" --working-dir . \
      --runtime-env-json "$RUNTIME_ENV" -- "$@" >/dev/null
  CURRENT=$id
  echo "   submitted $id; following its logs (Ctrl-C leaves it running)"
  ray job logs --address "$ADDRESS" --follow "$id" || true
  CURRENT=""
  local line status
  # `ray job status` ends with e.g. "Job '<id>' succeeded" / "... failed" / "... is currently RUNNING".
  line=$(ray job status --address "$ADDRESS" "$id" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -F "'$id'" | tail -n 1 || true)
  status=$(sed "s/'[^']*'//g" <<< "$line" | grep -ioE "succeeded|failed|stopped|running|pending" | tail -n 1 || true)
  status=$(tr '[:lower:]' '[:upper:]' <<< "${status:-unknown}")
  printf '   ray job status: %s\n' "${line#*-- }"
  printf '%-10s %-44s %-10s %5d s\n' "$name" "$id" "$status" "$((SECONDS - t0))" | tee -a "$REPORT"
  if [ "$status" != SUCCEEDED ]; then
    echo "job $name did not succeed; full logs: RAY_AUTH_MODE=token ray job logs --address $ADDRESS $id" >&2
    summary
    exit 1
  fi
}

summary() {
  printf '\n== jobs (%s, preset %s)\n%-10s %-44s %-10s %7s\n' "$ADDRESS" "$PRESET" job "submission id" status time
  cat "$REPORT"
}

steps() { if [ -n "${1:-}" ]; then echo "--steps $1"; fi; }

T_START=$SECONDS
printf '\n== local Ray head (token auth, 127.0.0.1)\n'
start_head

printf '\n== synthetic shapes set (%s train / %s val images)\n' "$SHAPES_TRAIN" "$SHAPES_VAL"
python jobs/make_shapes.py --out "$RUNS/shapes" --train "$SHAPES_TRAIN" --val "$SHAPES_VAL" --seed "$DEF_SEED"

# The python the cluster runs jobs with, and the trimodal it imports (the submitted one, via py_modules).
job check python -c "import sys, trimodal; print('job python:', sys.executable); print('trimodal from:', trimodal.__file__)"
# shellcheck disable=SC2046  # $(steps ...) is zero or two words
job stage0 python jobs/train_clip.py --preset "$PRESET" --coco-root "$RUNS/shapes" --out "$RUNS/clip" --resume \
    $(steps "${STEPS0:-}")
job preprocess python jobs/preprocess.py --preset "$PRESET" --coco-root "$RUNS/shapes" --vision "$RUNS/clip/tower" \
    --instruct "$RUNS/shapes/llava_instruct.json" --instruct "$RUNS/shapes/llava_instruct_val.json" --out "$RUNS/data"
# shellcheck disable=SC2046
job pretrain python jobs/pretrain.py --preset "$PRESET" --data "$RUNS/data" --out "$RUNS/pretrain" --resume \
    $(steps "${STEPS1:-}")
# shellcheck disable=SC2046
job finetune python jobs/finetune.py --preset "$PRESET" --data "$RUNS/data" --init "$RUNS/pretrain" \
    --out "$RUNS/finetune" --resume $(steps "${STEPS2:-}")

summary
cat <<MSG

All jobs succeeded in $((SECONDS - T_START)) s. Outputs under $RUNS (the finished model: $RUNS/finetune/final).
  Evaluate:   python jobs/evaluate.py --run $RUNS/finetune --data $RUNS/data
  Dashboard:  $ADDRESS   (the head keeps running; stop it with: make demo-stop, or ray stop)
MSG
