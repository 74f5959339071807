"""Fault drill: SIGKILL the Ray Train worker process mid-run; the run resumes from its last checkpoint and finishes.

Stage 1 of the `test` preset trains on a small preprocessed shapes set with one worker. Once metrics.jsonl shows
`--kill-at` steps done and the Ray Train controller has committed a checkpoint, the worker's process (the
RayTrainWorker actor, found with the Ray state API) gets SIGKILL from this script. Ray Train (FailureConfig
max_failures from the preset) starts a new worker group, which restores the newest committed checkpoint. Prints
the killed pid, the step reached before the kill, the checkpoint committed then, the step it resumed from, the
steps recomputed, the seconds until training ran again, and the final step.

A checkpoint counts once the controller has collected its report (checkpoint_manager_snapshot.json): Ray Train
polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so a worker killed sooner than that after
reporting a checkpoint loses it too, and the run resumes from the one before (or from step 0).

    python scripts/drills/train_worker_kill.py               # about a minute on 2 cores
    python scripts/drills/train_worker_kill.py --steps 60 --checkpoint-every 20 --kill-at 30
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from drillkit import actors, local_ray, print_table, wait_for

TRAIN_WORKER = "RayTrainWorker"


@dataclass
class Kill:
    """What the killer thread did."""

    pid: int = 0
    step_before: int = 0
    """Highest step in metrics.jsonl right after the kill."""
    committed: int = 0
    """Step of the newest checkpoint the controller had committed at the kill."""
    at: float = 0.0
    error: str = ""


@dataclass
class TrainDrill:
    """The drill's figures."""

    steps: int
    kill: Kill
    attempts: list[dict] = field(default_factory=list)
    logged_steps: list[int] = field(default_factory=list)
    final_steps: int = 0
    max_failures: int = 0
    seconds: float = 0.0

    @property
    def resumed_from(self) -> int:
        return self.attempts[-1]["step"] if len(self.attempts) > 1 else 0

    @property
    def recomputed(self) -> int:
        return self.kill.step_before - self.resumed_from

    @property
    def restart_s(self) -> float | None:
        return self.attempts[-1]["time"] - self.kill.at if len(self.attempts) > 1 else None


def prepare_data(work: Path) -> Path:
    """A small shapes set, preprocessed with the test preset's random CLIP (Ray Data)."""
    from trimodal.config import load_config
    from trimodal.data.preprocess import PipelineOptions, build_plan, run_preprocess
    from trimodal.data.shapes.dataset import write_shapes_dataset

    shapes, out = work / "shapes", work / "data"
    write_shapes_dataset(shapes, n_train=24, n_val=6, seed=1)
    plan = build_plan([shapes], [shapes / "llava_instruct.json"], log=lambda _: None)
    run_preprocess(plan, load_config("test").model.vision, out, PipelineOptions(batch_size=8, encoders=1),
                   log=lambda _: None)
    return out


def last_step(run_dir: Path) -> int:
    """The highest step in metrics.jsonl (0 before the first), ignoring a line still being written."""
    path, best = run_dir / "metrics.jsonl", 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                best = max(best, json.loads(line)["step"])
            except (ValueError, KeyError):
                continue
    return best


def committed_step(run_dir: Path) -> int:
    """Step of the newest checkpoint in Ray Train's checkpoint manager snapshot (0: none yet)."""
    path = run_dir / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(path.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or being rewritten
        return 0
    return int(latest.get("metrics", {}).get("step", 0))


def ready_to_kill(run_dir: Path, step: int) -> bool:
    """`step` steps done, a checkpoint committed, and steps done since it (there is work to lose)."""
    done, committed = last_step(run_dir), committed_step(run_dir)
    return done >= step and 0 < committed < done


def kill_worker_at(run_dir: Path, step: int, kill: Kill, timeout_s: float = 300) -> None:
    """Wait until `ready_to_kill`, then SIGKILL the (single) Ray Train worker process."""
    if not wait_for(lambda: ready_to_kill(run_dir, step), timeout_s, every_s=0.02):
        kill.error = f"step {step} with a committed checkpoint behind it was never reached"
        return
    workers = actors(TRAIN_WORKER)
    if len(workers) != 1:
        kill.error = f"expected one live {TRAIN_WORKER}, found {len(workers)}"
        return
    os.kill(workers[0].pid, signal.SIGKILL)
    kill.pid, kill.at, kill.step_before = workers[0].pid, time.time(), last_step(run_dir)
    kill.committed = committed_step(run_dir)


def run_drill(work: Path, steps: int, checkpoint_every: int, kill_at: int) -> TrainDrill:
    """Train stage 1 while a thread kills the worker at `kill_at`; collect the figures (Ray already running)."""
    from trimodal.config import load_config
    from trimodal.training.metrics import read_attempts, read_metrics
    from trimodal.training.trainer import run_stage

    data = prepare_data(work)
    cfg = load_config("test", {"stage1.steps": steps, "stage1.checkpoint_every": checkpoint_every,
                               "stage1.batch_size": 2, "stage1.log_every": steps, "stage1.num_to_keep": 2})
    run_dir, kill = work / "stage1", Kill()
    killer = threading.Thread(target=kill_worker_at, args=(run_dir, kill_at, kill), daemon=True)
    killer.start()
    start = time.perf_counter()
    final = run_stage(cfg, 1, data, run_dir)
    seconds = time.perf_counter() - start
    logged = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")]
    final_steps = json.loads((final / "run.json").read_text())["steps"]
    drill = TrainDrill(steps, kill, read_attempts(run_dir), logged, final_steps, cfg.stage1.max_failures, seconds)
    killer.join()
    return drill


def report(d: TrainDrill) -> None:
    """Print the figures."""
    restart = "-" if d.restart_s is None else f"{d.restart_s:.1f}"
    print_table("training: Ray Train worker SIGKILLed mid-run", [
        ("FailureConfig max_failures (preset)", d.max_failures),
        ("killed worker pid", d.kill.pid or d.kill.error), ("steps done before the kill", d.kill.step_before),
        ("checkpoint committed at the kill (step)", d.kill.committed),
        ("worker-group starts (step, pid)", ", ".join(f"({a['step']}, {a['pid']})" for a in d.attempts)),
        ("resumed from step (last checkpoint)", d.resumed_from), ("steps recomputed", d.recomputed),
        ("s from kill to the new worker training", restart),
        ("final step / planned", f"{d.final_steps} / {d.steps}"),
        ("metrics.jsonl steps 1..N once each", d.logged_steps == list(range(1, d.steps + 1))),
        ("wall s (train, kill and restart)", f"{d.seconds:.1f}")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--kill-at", type=int, default=30, help="kill once this many steps are done")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="drill-train-") as tmp, local_ray(num_cpus=4):
        report(run_drill(Path(tmp), args.steps, args.checkpoint_every, args.kill_at))


if __name__ == "__main__":
    main()
