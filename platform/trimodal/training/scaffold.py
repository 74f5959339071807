"""What every Ray Train stage shares: stage 0's CLIP loop (`clip.py`) and the stage 1-2 loop (`loop.py`).

Driver side: where a run keeps its checkpoints (`run_config`), how many workers of what size (`scaling_config`),
and the refusal to start a fresh run over a run's checkpoints (`check_resume`).

Worker side: the seeded worker start (`start_worker`), the checkpoint Ray Train hands over (`restored_checkpoint`),
the learning-rate schedule (`lr_lambda`), the resumable batch streams (`iterate_batches`, and
`iterate_length_batches` with batches of similar length), the optimizer step
(`step.py`: `optimizer_step`) and what ends every step (`StepReporter`: data position, metrics line, report, checkpoint).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from trimodal.config import StageConfig
from trimodal.training.checkpoint import TrainState
from trimodal.training.collate import Batch, Collator, length_batches
from trimodal.training.metrics import ATTEMPTS_FILE, WORKERS_FILE, MetricsLog

RAY_RUN_NAME = "train"
"""The folder under a run directory that holds Ray Train's checkpoints."""


class RunExistsError(RuntimeError):
    """The run directory has checkpoints and `--resume` was not given."""


# ---------------------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------------------


def scaling_config(stage: StageConfig):
    """CPU workers for cpu/test, GPU workers (with accelerator_type when set) for phi2."""
    from ray.train import ScalingConfig

    resources = {"CPU": stage.cpus_per_worker}
    if stage.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=stage.num_workers, use_gpu=stage.use_gpu, resources_per_worker=resources,
                         accelerator_type=stage.accelerator_type if stage.use_gpu else None)


def torch_config(stage: StageConfig):
    """The process group: NCCL for CUDA tensors where this torch build has NCCL, Gloo for the rest.

    Ray Train picks NCCL for any worker granted a GPU and starts it even for one worker; a CPU build of torch (a node
    whose GPU torch cannot use) has no NCCL, so that start fails. On one node the group listens on loopback only
    (`process_group.py`).
    """
    import torch.distributed as dist

    from trimodal.training.process_group import LoopbackTorchConfig

    return LoopbackTorchConfig(backend="cpu:gloo,cuda:nccl" if stage.use_gpu and dist.is_nccl_available() else "gloo")


def run_config(out_dir: Path, stage: StageConfig):
    """Checkpoints under OUT/train, keeping `num_to_keep`; `max_failures` worker-group restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=RAY_RUN_NAME, storage_path=str(out_dir.resolve()),
                     checkpoint_config=CheckpointConfig(num_to_keep=stage.num_to_keep),
                     failure_config=FailureConfig(max_failures=stage.max_failures))


def check_resume(out_dir: Path, resume: bool) -> None:
    """Refuse to mix a fresh run into a directory with checkpoints unless resuming."""
    storage = out_dir / RAY_RUN_NAME
    has_checkpoints = storage.exists() and any(storage.glob("checkpoint_*"))
    if has_checkpoints and not resume:
        raise RunExistsError(f"{out_dir} already holds checkpoints: pass --resume to continue from the last one, "
                             "or choose a new --out")
    if not resume:
        shutil.rmtree(out_dir / "final", ignore_errors=True)
        (out_dir / ATTEMPTS_FILE).unlink(missing_ok=True)
        (out_dir / WORKERS_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------------


def worker_device() -> torch.device:
    """The GPU Ray Train assigned this worker where torch sees CUDA, else the CPU: Ray Train's get_device() names
    cuda:N for any granted GPU resource, whether or not torch can use one."""
    import ray.train.torch

    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


def start_worker(stage: StageConfig) -> int:
    """Set this worker's torch threads and seed (the stage seed plus the rank); returns the rank."""
    rank = ray.train.get_context().get_world_rank()
    if stage.torch_threads:
        torch.set_num_threads(stage.torch_threads)
    torch.manual_seed(stage.seed + rank)
    return rank


@contextmanager
def restored_checkpoint() -> Iterator[Path | None]:
    """The checkpoint Ray Train hands this worker (a restarted worker group or a `--resume`d run) as a local
    folder, or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def lr_lambda(stage: StageConfig):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def lr_lambdas(stage: StageConfig, groups: int) -> list:
    """One `lr_lambda` per parameter group of `policies.param_groups`; the second group (the LoRA adapters) stops
    at `stage.lora_steps` when that is set."""
    schedule = lr_lambda(stage)

    def adapters(step: int) -> float:
        return schedule(step) if not stage.lora_steps or step < stage.lora_steps else 0.0

    return [schedule, adapters][:groups]


def _resumable(epoch_batches: Callable[[int], Iterable[Any]], start: TrainState,
               batch_size: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batch index, batch) forever from `epoch_batches(epoch)`, skipping what a resumed run consumed."""
    epoch, skip = start.epoch, start.batch_in_epoch
    while True:
        produced = False
        for index, batch in enumerate(epoch_batches(epoch)):
            produced = True
            if index >= skip:
                yield epoch, index, batch
        if not produced:
            raise RuntimeError(f"the training shard has fewer than {batch_size} rows: lower --batch-size")
        epoch, skip = epoch + 1, 0


def iterate_batches(shard, collate, batch_size: int, start: TrainState, seed: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batch index, batch) forever, skipping what a resumed run already consumed.

    Each epoch is locally shuffled with its own seed, so a resumed run sees the batches an uninterrupted one would.
    """
    def epoch_batches(epoch: int) -> Iterable[Any]:
        return shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=True,
                                        local_shuffle_buffer_size=max(1024, batch_size * 16),
                                        local_shuffle_seed=seed + epoch)

    return _resumable(epoch_batches, start, batch_size)


def iterate_length_batches(shard, collator: Collator, batch_size: int, window: int, start: TrainState,
                           seed: int) -> Iterator[tuple[int, int, Batch]]:
    """`iterate_batches` with less padding: the rows of each `window` batches are sorted by token count and cut into
    batches (`length_batches`), whose order within the window is shuffled. A window of 1 keeps batches as drawn.

    Every order is seeded by (seed, epoch), so a resumed run still sees the batches an uninterrupted one would.
    """
    def epoch_batches(epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([seed, epoch])
        for rows in shard.iter_batches(batch_size=batch_size * window, batch_format="numpy",
                                       local_shuffle_buffer_size=max(1024, batch_size * 16),
                                       local_shuffle_seed=seed + epoch):
            for examples in length_batches(collator.encode(rows), batch_size, rng):
                yield collator.collate(examples)

    return _resumable(epoch_batches, start, batch_size)


def report(metrics: dict, with_checkpoint: bool, save: Callable[[Path], None]) -> None:
    """ray.train.report from every worker; with a checkpoint that rank 0 writes with `save(directory)`."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


@dataclass
class StepReporter:
    """What ends every optimizer step of a stage loop."""

    stage: StageConfig
    log: MetricsLog
    scheduler: Any
    save: Callable[[Path], None]
    """Writes a checkpoint into the folder it is given (rank 0 only)."""

    def finish(self, state: TrainState, index: int, loss: float, started: float, counts: dict[str, int],
               extra: dict | None = None, before_report: Callable[[], None] | None = None) -> dict:
        """Advance `state` past batch `index`, log the step's metrics (each of `counts`, e.g. {"tokens": n},
        becomes a rate, "tokens_per_s"), run `before_report`, then report the metrics to Ray Train at every
        progress line, with a checkpoint every `checkpoint_every` steps and at the last step."""
        stage = self.stage
        state.step, state.batch_in_epoch = state.step + 1, index + 1
        seconds = time.perf_counter() - started
        metrics = {"step": state.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "step_time_s": seconds,
                   **{f"{name}_per_s": n / seconds for name, n in counts.items()}, **(extra or {}),
                   "epoch": state.epoch}
        self.log.step(metrics, print_line=state.step % stage.log_every == 0 or state.step == stage.steps)
        if before_report is not None:
            before_report()
        with_checkpoint = state.step % stage.checkpoint_every == 0 or state.step == stage.steps
        if with_checkpoint or state.step % stage.log_every == 0:
            report(metrics, with_checkpoint, self.save)
        return metrics
