#!/usr/bin/env bash
# make demo: the whole pipeline on the embedded default (`cpu` preset), fully offline, on a local Ray head:
# shapes set -> stage 0 (tiny CLIP) -> preprocess -> stage 1 -> stage 2 -> evaluate -> Ray Serve -> 3 questions.
# Idempotent and resumable: finished steps are skipped, interrupted training resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"
export RAY_AUTH_MODE=token            # Ray's token authentication stays on (token in ~/.ray/auth_token)
RUNS="$ROOT/runs/demo"
PORT=${TRIMODAL_PORT:-8000}
TIMES="$RUNS/timings.txt"
mkdir -p "$RUNS"
: > "$TIMES"
SUBMIT=(ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json
        '{"excludes": [".venv", "runs", ".git", "*.egg-info", "__pycache__"]}' --)

step() {  # step NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists; print and record its time
  local name=$1 done_file=$2; shift 2
  printf '\n== %s\n' "$name"
  if [ -n "$done_file" ] && [ -e "$done_file" ]; then echo "   already done ($done_file)"; echo "$name: skipped" >> "$TIMES"; return; fi
  local t0=$SECONDS
  "$@"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$TIMES"
}

start_head() {
  if ray status --address 127.0.0.1:6379 >/dev/null 2>&1; then echo "   a local Ray head is already running"; return; fi
  ray start --head --node-ip-address=127.0.0.1 --port=6379 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
      --num-cpus="$(nproc)" --disable-usage-stats
}

serve_up() {
  if curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then echo "   already serving on :$PORT"; return; fi
  TRIMODAL_PRESET=cpu TRIMODAL_RUN="$RUNS/finetune/final" RAY_ADDRESS=127.0.0.1:6379 \
      nohup serve run serve_app:graph > "$RUNS/serve.log" 2>&1 &
  echo $! > "$RUNS/serve.pid"
  for _ in $(seq 1 180); do
    # /healthz only shows the ingress is up; the first /v1/models asks every deployment, so it means ready.
    if curl -fsS "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1; then echo "   serving on http://127.0.0.1:$PORT"; return; fi
    sleep 2
  done
  echo "   Serve did not become healthy; see $RUNS/serve.log" >&2
  tail -n 30 "$RUNS/serve.log" >&2
  return 1
}

step "1/10 install" "" make --no-print-directory install
step "2/10 local Ray head (token auth, 127.0.0.1)" "" start_head
step "3/10 synthetic shapes set" "" python jobs/make_shapes.py --out "$RUNS/shapes" --train 2000 --val 200 --seed 0
step "4/10 stage 0: tiny CLIP (ray job submit)" "$RUNS/clip/tower/stage0.json" \
  "${SUBMIT[@]}" python jobs/train_clip.py --preset cpu --coco-root "$RUNS/shapes" --out "$RUNS/clip" --resume
step "5/10 preprocess: CLIP embeddings to Parquet (ray job submit)" "$RUNS/data/manifest.json" \
  "${SUBMIT[@]}" python jobs/preprocess.py --preset cpu --coco-root "$RUNS/shapes" --vision "$RUNS/clip/tower" \
  --instruct "$RUNS/shapes/llava_instruct.json" --instruct "$RUNS/shapes/llava_instruct_val.json" --out "$RUNS/data"
step "6/10 stage 1: projector on captions (ray job submit)" "$RUNS/pretrain/final/run.json" \
  "${SUBMIT[@]}" python jobs/pretrain.py --preset cpu --data "$RUNS/data" --out "$RUNS/pretrain" --resume
step "7/10 stage 2: QLoRA + projector on conversations (ray job submit)" "$RUNS/finetune/final/run.json" \
  "${SUBMIT[@]}" python jobs/finetune.py --preset cpu --data "$RUNS/data" --init "$RUNS/pretrain" \
  --out "$RUNS/finetune" --resume
step "8/10 evaluate on held-out images" "$RUNS/finetune/eval.json" \
  python jobs/evaluate.py --run "$RUNS/finetune" --data "$RUNS/data"
step "9/10 serve run serve_app:graph (background)" "" serve_up
step "10/10 ask over HTTP with the openai client" "" \
  python scripts/demo_client.py --base-url "http://127.0.0.1:$PORT/v1" --shapes "$RUNS/shapes" --audio assets/what_color.wav

cat <<MSG

Done. Step times: $TIMES
  Web page:  open http://127.0.0.1:$PORT/  (from another machine: ssh -L $PORT:127.0.0.1:$PORT <this host>)
  API:       curl http://127.0.0.1:$PORT/v1/models
  Stop:      serve shutdown -y --address http://127.0.0.1:8265 && ray stop   (or: make demo-stop)
MSG
