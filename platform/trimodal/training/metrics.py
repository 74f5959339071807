"""Run visibility: a progress line every N steps, `metrics.jsonl` and a loss-curve PNG written as the run goes,
`attempts.jsonl`: one line per worker-group start (step it started at, pid, time), so restarts show, and
`workers.jsonl`: one line per worker that finished training (its rank, the steps it ran, a digest of the data it
saw and of the weights it ends with), so a multi-worker run shows that every rank trained, in sync."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trimodal.files import publish_file

ATTEMPTS_FILE = "attempts.jsonl"
WORKERS_FILE = "workers.jsonl"


class MetricsLog:
    """Rank 0 appends one JSON line per step and redraws `loss.png` at each progress line."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.started = time.perf_counter()
        self.total_steps = 0

    def start(self, stage: int, trainable: int, total: int, step: int, total_steps: int) -> None:
        """Print the parameter counts and where training starts."""
        self.total_steps = total_steps
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        where = f"resuming at step {step}" if step else "starting at step 0"
        print(f"[stage {stage}] trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f} | {where} of {total_steps}", flush=True)
        with (self.run_dir / ATTEMPTS_FILE).open("a") as fh:
            fh.write(json.dumps({"step": step, "pid": os.getpid(), "time": time.time()}) + "\n")
        if step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run: no stale lines from an earlier one
        self._drop_lines_after(step)

    def _drop_lines_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def step(self, metrics: dict, print_line: bool) -> None:
        """Record one step; print a progress line and redraw the plot when asked."""
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if print_line:
            elapsed = time.perf_counter() - self.started
            print(f"step {metrics['step']}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                  f"{metrics['step_time_s']:.2f}s/step {metrics['tokens_per_s']:.0f} tok/s elapsed {elapsed:.0f}s",
                  flush=True)
            plot_loss(self.path, self.run_dir / "loss.png")


def read_attempts(run_dir: Path) -> list[dict]:
    """The worker-group starts of a run, oldest first: {"step", "pid", "time"} each."""
    path = Path(run_dir) / ATTEMPTS_FILE
    return read_metrics(path) if path.exists() else []


def record_worker(run_dir: Path, row: dict) -> None:
    """Append one worker's end-of-training record to `workers.jsonl`; every rank writes its own line."""
    with (Path(run_dir) / WORKERS_FILE).open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_workers(run_dir: Path) -> list[dict]:
    """The end-of-training records of a run's workers, in the order they finished (`train_loop` writes them)."""
    path = Path(run_dir) / WORKERS_FILE
    return read_metrics(path) if path.exists() else []


def read_metrics(path: Path) -> list[dict]:
    """All lines of a metrics.jsonl."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and its running mean) against step, as a PNG replaced in one rename."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with publish_file(png_path) as scratch:
        fig.savefig(scratch)
    plt.close(fig)
