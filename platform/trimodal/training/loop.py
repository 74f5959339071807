"""The Ray Train worker loop shared by stage 1 and stage 2.

Every worker builds its stage model, restores the last checkpoint if Ray Train hands one over (a restarted
worker group or a `--resume`d run), then trains on its Ray Data shard. The data position (epoch, batch within
the epoch) is checkpointed so a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
import ray.train.torch
import torch

from trimodal.config import StageConfig, TrimodalConfig, config_from_dict
from trimodal.models.bundle import RunInfo
from trimodal.training.checkpoint import TrainState, load_training_state, save_training_state, weights_digest
from trimodal.training.collate import Batch, Collator
from trimodal.training.metrics import MetricsLog, record_worker
from trimodal.training.policies import StageModel, stage1_model, stage2_model
from trimodal.training.samples import print_samples


@dataclass
class LoopOptions:
    """What the driver tells every worker."""

    stage: int
    """1 (projector) or 2 (QLoRA + projector)."""
    run_dir: str
    """The run directory (metrics.jsonl, loss.png, samples.jsonl)."""
    vision_dim: int
    """Width of the precomputed CLIP features."""
    num_patches: int
    """Patch positions per image."""
    init_run: str | None = None
    """Stage 2: the stage-1 run whose projector starts training."""
    quantize: bool = True
    """Stage 2: load the LM in 4 bit."""
    fail_at_step: int = 0
    """Test hook: raise once at this step (0: never) to exercise FailureConfig."""


def lr_lambda(stage: StageConfig):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_stage(cfg: TrimodalConfig, opts: LoopOptions, device, ckpt_dir: Path | None) -> StageModel:
    """The stage's model; stage 2 resumes its adapter from the checkpoint when there is one."""
    if opts.stage == 1:
        return stage1_model(cfg, opts.vision_dim, device)
    from trimodal.models.bundle import read_run

    init = read_run(opts.init_run) if opts.init_run else RunInfo(None, None, False)
    adapter = ckpt_dir / "adapter" if ckpt_dir is not None and (ckpt_dir / "adapter").exists() else None
    return stage2_model(cfg, opts.vision_dim, init, device, quantize=opts.quantize, adapter_dir=adapter)


def iterate_batches(shard, collate, batch_size: int, start: TrainState, seed: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batch index, batch) forever, skipping what a resumed run already consumed.

    Each epoch is locally shuffled with its own seed, so a resumed run sees the batches an uninterrupted one would.
    """
    epoch, skip = start.epoch, start.batch_in_epoch
    while True:
        batches = shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=True,
                                           local_shuffle_buffer_size=max(1024, batch_size * 16),
                                           local_shuffle_seed=seed + epoch)
        produced = False
        for index, batch in enumerate(batches):
            produced = True
            if index >= skip:
                yield epoch, index, batch
        if not produced:
            raise RuntimeError(f"the training shard has fewer than {batch_size} rows: lower --batch-size")
        epoch, skip = epoch + 1, 0


def _to_device(batch: Batch, device) -> Batch:
    feats = None if batch.image_features is None else batch.image_features.to(device)
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device), feats)


def native_bf16(device) -> bool:
    """Whether `device` runs bfloat16 matmuls natively (CUDA with bf16, or a CPU with AMX or AVX512-BF16)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def use_autocast(stage: StageConfig, device) -> bool:
    """bf16 autocast when the stage asks for it and the hardware runs it natively (emulated bf16 is slower)."""
    if not stage.autocast_bf16:
        return False
    if native_bf16(device):
        return True
    print(f"[train] autocast_bf16 requested, but {device} has no native bfloat16: training in float32", flush=True)
    return False


def train_step(model, batch: Batch, optimizer, scheduler, autocast: bool, device) -> tuple[float, int]:
    """One optimizer step; returns (loss, target tokens)."""
    model.train()
    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"
    with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
        loss, n_targets = model(batch.input_ids, batch.attention_mask, batch.image_features, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), n_targets


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


def _maybe_fail(opts: LoopOptions, step: int) -> None:
    marker = Path(opts.run_dir) / ".injected_failure"
    if opts.fail_at_step and step == opts.fail_at_step and not marker.exists():
        marker.write_text(str(step))
        raise RuntimeError(f"injected failure at step {step} (test hook)")


def _record_worker(opts: LoopOptions, sm: StageModel, started: int, step: int, losses: list[float], data) -> None:
    """This worker's line of `workers.jsonl`: its rank, the steps it ran, a digest of the input ids it trained on,
    and digests of its projector and of all its trainable weights after the last step (equal on every rank when
    the gradients were all-reduced)."""
    context = ray.train.get_context()
    trainable = {n: p for n, p in sm.model.named_parameters() if p.requires_grad}
    record_worker(Path(opts.run_dir), {
        "rank": context.get_world_rank(), "world_size": context.get_world_size(), "pid": os.getpid(),
        "started_step": started, "step": step, "steps_run": len(losses),
        "mean_loss": sum(losses) / len(losses) if losses else None, "data_sha256": data.hexdigest(),
        "projector_sha256": weights_digest(sm.model.projector.state_dict()),
        "trainable_sha256": weights_digest(trainable)})


def train_loop(config: dict) -> None:
    """Ray Train entry point (one call per worker)."""
    cfg = config_from_dict(config["cfg"])
    opts = LoopOptions(**config["opts"])
    stage = cfg.stage1 if opts.stage == 1 else cfg.stage2
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if stage.torch_threads:
        torch.set_num_threads(stage.torch_threads)
    torch.manual_seed(stage.seed + rank)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as ckpt_dir:
        ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        sm = build_stage(cfg, opts, device, ckpt_dir)
        params = [p for p in sm.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
        state = load_training_state(ckpt_dir, sm.model, optimizer, scheduler) if ckpt_dir else TrainState()
    log = MetricsLog(Path(opts.run_dir), enabled=rank == 0)
    log.start(opts.stage, sm.trainable, sm.total, state.step, stage.steps)
    model = ray.train.torch.prepare_model(sm.model, move_to_device=False) if ray.train.get_context(
    ).get_world_size() > 1 else sm.model
    collate = Collator(sm.tokenizer, opts.num_patches, sm.image_end_id, cfg.data.max_length, cfg.data.caption_prompt)
    batches = iterate_batches(ray.train.get_dataset_shard("train"), collate, stage.batch_size, state, stage.seed)
    autocast = use_autocast(stage, device)
    started, losses, data = state.step, [], hashlib.sha256()
    while state.step < stage.steps:
        start = time.perf_counter()
        state.epoch, index, batch = next(batches)
        data.update(batch.input_ids.cpu().numpy().tobytes())
        batch = _to_device(batch, device)
        _maybe_fail(opts, state.step + 1)
        loss, n_targets = train_step(model, batch, optimizer, scheduler, autocast, device)
        losses.append(loss)
        state.step, state.batch_in_epoch = state.step + 1, index + 1
        seconds = time.perf_counter() - start
        metrics = {"step": state.step, "loss": loss, "lr": scheduler.get_last_lr()[0], "step_time_s": seconds,
                   "tokens_per_s": int(batch.attention_mask.sum()) / seconds, "target_tokens": n_targets,
                   "epoch": state.epoch}
        log.step(metrics, print_line=state.step % stage.log_every == 0 or state.step == stage.steps)
        if rank == 0 and stage.sample_every and state.step % stage.sample_every == 0:
            print_samples(sm, config.get("samples", []), opts, state.step, device)
        ckpt = state.step % stage.checkpoint_every == 0 or state.step == stage.steps
        if ckpt or state.step % stage.log_every == 0:
            report(metrics, ckpt, lambda d: save_training_state(d, sm.model, optimizer, scheduler, state, cfg))
    _record_worker(opts, sm, started, state.step, losses, data)
