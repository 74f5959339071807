#!/usr/bin/env bash
# make demo: the whole pipeline on the embedded default (`cpu` preset), fully offline, on a local Ray head:
# shapes set -> stage 0 (tiny CLIP) -> preprocess -> stage 1 -> stage 2 -> evaluate -> Ray Serve -> 3 questions.
# Idempotent and resumable: finished steps are skipped, interrupted training resumes from its last checkpoint.
#
#   make demo                                                  # the `cpu` preset and its schedule (README: how long)
#   PRESET=test STEPS0=2 STEPS1=2 STEPS2=2 make demo           # tiny random models: a smoke test in minutes
#   make demo-stop   (bash scripts/demo.sh stop)               # stop the server and the head
#
# Environment: as in scripts/common.sh (PRESET, STEPS0/1/2, SHAPES_TRAIN/VAL, RAY_PORT, DASHBOARD_PORT,
# RAY_START_ARGS), and RUNS [runs/demo, or runs/demo-$PRESET for another preset], TRIMODAL_PORT [8000].
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
DEFAULT_RUNS=runs/demo
if [ "$PRESET" != cpu ]; then DEFAULT_RUNS="runs/demo-$PRESET"; fi
RUNS=$(abspath "${RUNS:-$DEFAULT_RUNS}")
PORT=${TRIMODAL_PORT:-8000}
URL="http://127.0.0.1:$PORT"
SERVE_PID="$RUNS/serve.pid"

if [ "${1:-}" = stop ]; then
  if [ ! -x "$ROOT/.venv/bin/python" ]; then echo "error: nothing to stop: no demo has run here (no .venv)" >&2; exit 1; fi
  exec python scripts/local_head.py stop --port "$RAY_PORT" --serve-pid-file "$SERVE_PID" --serve-port "$PORT"
fi

mkdir -p "$RUNS"
# One demo at a time per RUNS: a second one would train into the same directories.
exec 9> "$RUNS/.demo.lock"
if ! flock -n 9; then
  echo "error: a demo is already running in $RUNS (pid $(cat "$RUNS/.demo.pid" 2>/dev/null || echo '?')); wait for it" \
       "to finish, or stop it with: make demo-stop" >&2
  exit 1
fi
echo $$ > "$RUNS/.demo.pid"
TIMES="$RUNS/timings.txt"
REPORT="$RUNS/jobs.txt"
: > "$TIMES"
: > "$REPORT"

step() {  # step NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists; print and record its time
  local name=$1 done_file=$2; shift 2
  printf '\n== %s\n' "$name"
  if [ -n "$done_file" ] && [ -e "$done_file" ]; then echo "   already done ($done_file)"; echo "$name: skipped" >> "$TIMES"; return; fi
  local t0=$SECONDS
  "$@" 9>&-
  echo "$name: $((SECONDS - t0)) s" | tee -a "$TIMES"
}

ours_serving() {  # the demo's own `serve run` is alive and its app answers
  [ -f "$SERVE_PID" ] && kill -0 "$(cat "$SERVE_PID")" 2>/dev/null && curl -fsS "$URL/healthz" >/dev/null 2>&1
}

check_serve_port() {
  if ! ours_serving && python -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)))"; then
    echo "error: port $PORT is taken by another program, so the demo could not serve there; free it, or choose" \
         "another port: TRIMODAL_PORT=8001 make demo" >&2
    exit 1
  fi
}

serve_up() {
  if ours_serving; then echo "   already serving on $URL (pid $(cat "$SERVE_PID"))"; return; fi
  check_serve_port
  serve start --address "127.0.0.1:$RAY_PORT" --http-host 127.0.0.1 --http-port "$PORT" > "$RUNS/serve.log" 2>&1
  TRIMODAL_PRESET="$PRESET" TRIMODAL_RUN="$RUNS/finetune/final" RAY_ADDRESS="127.0.0.1:$RAY_PORT" \
      nohup serve run serve_app:graph >> "$RUNS/serve.log" 2>&1 9>&- &
  echo $! > "$SERVE_PID"
  for _ in $(seq 1 240); do
    # /healthz only shows the ingress lives; /readyz answers 200 once every deployment answers.
    if curl -fsS "$URL/readyz" >/dev/null 2>&1; then echo "   serving on $URL"; return; fi
    if ! kill -0 "$(cat "$SERVE_PID")" 2>/dev/null; then break; fi
    sleep 2
  done
  echo "error: Serve did not become ready; the last lines of $RUNS/serve.log:" >&2
  tail -n 30 "$RUNS/serve.log" >&2
  return 1
}

demo_jobs() {
  # shellcheck disable=SC2046  # $(steps ...) is zero or two words
  step "4/10 stage 0: tiny CLIP (ray job submit)" "$RUNS/clip/tower/stage0.json" \
    submit_job stage0 python jobs/train_clip.py --preset "$PRESET" --coco-root "$RUNS/shapes" --out "$RUNS/clip" \
    --resume $(steps "${STEPS0:-}")
  step "5/10 preprocess: CLIP embeddings to Parquet (ray job submit)" "$RUNS/data/manifest.json" \
    submit_job preprocess python jobs/preprocess.py --preset "$PRESET" --coco-root "$RUNS/shapes" \
    --vision "$RUNS/clip/tower" --instruct "$RUNS/shapes/llava_instruct.json" \
    --instruct "$RUNS/shapes/llava_instruct_val.json" --out "$RUNS/data"
  # shellcheck disable=SC2046
  step "6/10 stage 1: projector on captions (ray job submit)" "$RUNS/pretrain/final/run.json" \
    submit_job pretrain python jobs/pretrain.py --preset "$PRESET" --data "$RUNS/data" --out "$RUNS/pretrain" \
    --resume $(steps "${STEPS1:-}")
  # shellcheck disable=SC2046
  step "7/10 stage 2: LoRA + projector on conversations (ray job submit)" "$RUNS/finetune/final/run.json" \
    submit_job finetune python jobs/finetune.py --preset "$PRESET" --data "$RUNS/data" --init "$RUNS/pretrain" \
    --out "$RUNS/finetune" --resume $(steps "${STEPS2:-}")
}

check_serve_port   # before minutes of training, not after
step "1/10 install" "" make --no-print-directory install
read_preset_defaults
step "2/10 local Ray head (token auth, 127.0.0.1)" "" start_head
step "3/10 synthetic shapes set" "" \
  python jobs/make_shapes.py --out "$RUNS/shapes" --train "$SHAPES_TRAIN" --val "$SHAPES_VAL" --seed "$SHAPES_SEED"
demo_jobs
# The trained model answers first; the held-out table, minutes of decoding, follows while the server stays up.
step "8/10 serve run serve_app:graph (background)" "" serve_up
step "9/10 ask over HTTP with the openai client" "" \
  python scripts/demo_client.py --base-url "$URL/v1" --shapes "$RUNS/shapes" --audio assets/what_color.wav
step "10/10 evaluate on held-out images" "$RUNS/finetune/eval.json" \
  python jobs/evaluate.py --run "$RUNS/finetune" --data "$RUNS/data"

cat <<MSG

Done. Step times: $TIMES
  Web page:  open $URL/  (from another machine: ssh -L $PORT:127.0.0.1:$PORT <this host>)
  API:       curl $URL/v1/models
  Stop:      make demo-stop   (ends the server and this Ray head only)
MSG
