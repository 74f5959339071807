# Sourced by scripts/demo.sh and scripts/local_jobs.sh: the venv on PATH, the local head's settings, the preset's
# defaults, and one way to submit a job (submit without waiting, follow its logs, then ask for its status).
#
# Environment (defaults in brackets):
#   PRESET [cpu]                            the preset every job and the server use
#   STEPS0 STEPS1 STEPS2 [the preset's]     steps of stage 0 / 1 / 2
#   SHAPES_TRAIN SHAPES_VAL [the preset's]  size of the synthetic shapes set
#   RAY_PORT [6379]  DASHBOARD_PORT [8265]  the head's GCS and dashboard / job API ports
#   RAY_START_ARGS                          extra `ray start` flags for a new head (e.g. --temp-dir=..., more ports)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$ROOT/.venv/bin:$PATH"
# Token authentication on; Ray's single-node switch, so the head and everything it starts listen on 127.0.0.1 only
# (see scripts/local_head.py); no usage report from Ray, vLLM or Hugging Face (trimodal.inference.vllm_engine's
# NO_TELEMETRY_ENV): the head, its jobs and replicas, and `serve run` inherit these.
export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1
PRESET=${PRESET:-cpu}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"

abspath() { python -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$1"; }

start_head() {
  # shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
  python "$ROOT/scripts/local_head.py" start --port "$RAY_PORT" --dashboard-port "$DASHBOARD_PORT" -- ${RAY_START_ARGS:-}
}

read_preset_defaults() {  # sets SHAPES_TRAIN, SHAPES_VAL, SHAPES_SEED and RUNTIME_ENV for $PRESET
  local def_train def_val
  read -r def_train def_val SHAPES_SEED < <(python -c "
from trimodal.config import load_config
d = load_config('$PRESET').data
print(d.shapes_train, d.shapes_val, d.shapes_seed)")
  if [ -z "${SHAPES_SEED:-}" ]; then echo "error: cannot read preset $PRESET" >&2; exit 1; fi
  SHAPES_TRAIN=${SHAPES_TRAIN:-$def_train}
  SHAPES_VAL=${SHAPES_VAL:-$def_val}
  local hub_offline=1
  if [ "$PRESET" = phi2 ]; then hub_offline=0; fi
  # What travels with every job: the working dir without the venv, runs and VCS data; the library itself as a
  # py_module (so the job and its workers run the code you submitted, not whatever is installed on the node).
  RUNTIME_ENV=$(cat <<JSON
{"excludes": [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache"],
 "py_modules": ["platform/trimodal"],
 "env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "$hub_offline"}}
JSON
)
}

steps() { if [ -n "${1:-}" ]; then echo "--steps $1"; fi; }

CURRENT=""
trap 'if [ -n "$CURRENT" ]; then echo; echo "interrupted: job $CURRENT keeps running; stop it with: RAY_AUTH_MODE=token ray job stop --address $ADDRESS $CURRENT" >&2; fi' INT

submit_job() {  # submit_job NAME COMMAND...: run COMMAND as a Ray job; a line in $REPORT; exit 1 if it failed
  local name=$1; shift
  local id; id="trimodal-$name-$(date +%Y%m%d-%H%M%S)"
  printf '   ray job submit: %s\n' "$*"
  local t0=$SECONDS
  local tries=0 err
  # A head that has just started (or a busy machine) may answer "No available agent to submit job" until its job
  # agent has registered: that one answer is retried for up to a minute; any other failure ends the run.
  until err=$(cd "$ROOT" && ray job submit --address "$ADDRESS" --no-wait --submission-id "$id" --working-dir . \
      --runtime-env-json "$RUNTIME_ENV" -- "$@" 2>&1 >/dev/null); do
    tries=$((tries + 1))
    if ! grep -q "No available agent" <<< "$err" || [ $((SECONDS - t0)) -ge 60 ]; then
      printf '%s\n' "$err" >&2
      echo "error: could not submit job $name to $ADDRESS" >&2
      exit 1
    fi
    if [ "$tries" = 1 ]; then echo "   the head's job agent is not ready yet; retrying for up to a minute"; fi
    sleep 2
  done
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
  printf '%-10s %-44s %-10s %5d s\n' "$name" "$id" "$status" "$((SECONDS - t0))" >> "$REPORT"
  if [ "$status" != SUCCEEDED ]; then
    echo "error: job $name did not succeed; full logs: RAY_AUTH_MODE=token ray job logs --address $ADDRESS $id" >&2
    exit 1
  fi
}
