"""The Ray Train worker loop of stage 1 and stage 2 (stage 0's is in `clip.py`; both use `scaffold.py`).

Every worker builds its stage model, restores the last checkpoint if Ray Train hands one over (a restarted
worker group or a `--resume`d run), then trains on its Ray Data shard. The data position (epoch, batch within
the epoch) is checkpointed so a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from trimodal.config import StageConfig, TrimodalConfig, config_from_dict
from trimodal.runs import RunInfo
from trimodal.training.checkpoint import TrainState, load_training_state, save_training_state, weights_digest
from trimodal.training.collate import Batch, Collator
from trimodal.training.metrics import MetricsLog, record_worker
from trimodal.training.policies import StageModel, param_groups, stage1_model, stage2_model
from trimodal.training.samples import print_samples
from trimodal.training.scaffold import (StepReporter, iterate_length_batches, lr_lambdas, restored_checkpoint,
                                        start_worker, worker_device)
from trimodal.training.step import compile_decoder_layers, train_step, use_autocast


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


def build_stage(cfg: TrimodalConfig, options: LoopOptions, device, ckpt_dir: Path | None) -> StageModel:
    """The stage's model; stage 2 resumes its adapter from the checkpoint when there is one."""
    if options.stage == 1:
        return stage1_model(cfg, options.vision_dim, device, num_patches=options.num_patches)
    from trimodal.runs import read_run

    init = read_run(options.init_run) if options.init_run else RunInfo(None, None, False)
    adapter = ckpt_dir / "adapter" if ckpt_dir is not None and (ckpt_dir / "adapter").exists() else None
    return stage2_model(cfg, options.vision_dim, init, device, quantize=options.quantize, adapter_dir=adapter,
                        num_patches=options.num_patches)


def _to_device(batch: Batch, device) -> Batch:
    feats = None if batch.image_features is None else batch.image_features.to(device)
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device), feats)


def _maybe_fail(options: LoopOptions, step: int) -> None:
    marker = Path(options.run_dir) / ".injected_failure"
    if options.fail_at_step and step == options.fail_at_step and not marker.exists():
        marker.write_text(str(step))
        raise RuntimeError(f"injected failure at step {step} (test hook)")


def _record_worker(options: LoopOptions, stage_model: StageModel, started: int, step: int, losses: list[float],
                   data) -> None:
    """This worker's line of `workers.jsonl`: its rank, the steps it ran, a digest of the input ids it trained on,
    and digests of its projector and of all its trainable weights after the last step (equal on every rank when
    the gradients were all-reduced)."""
    context = ray.train.get_context()
    trainable = {n: p for n, p in stage_model.model.named_parameters() if p.requires_grad}
    record_worker(Path(options.run_dir), {
        "rank": context.get_world_rank(), "world_size": context.get_world_size(), "pid": os.getpid(),
        "started_step": started, "step": step, "steps_run": len(losses),
        "mean_loss": sum(losses) / len(losses) if losses else None, "data_sha256": data.hexdigest(),
        "projector_sha256": weights_digest(stage_model.model.projector.state_dict()),
        "trainable_sha256": weights_digest(trainable)})


def _restore(cfg: TrimodalConfig, options: LoopOptions, stage: StageConfig, device):
    """The stage model, its optimizer and schedule, and the training state: restored from the checkpoint Ray
    Train hands over, fresh otherwise."""
    with restored_checkpoint() as ckpt_dir:
        stage_model = build_stage(cfg, options, device, ckpt_dir)
        optimizer = torch.optim.AdamW(param_groups(stage_model.model, stage), weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(stage, len(optimizer.param_groups)))
        state = load_training_state(ckpt_dir, stage_model.model, optimizer, scheduler) if ckpt_dir else TrainState()
    return stage_model, optimizer, scheduler, state


def train_loop(config: dict) -> None:
    """Ray Train entry point (one call per worker)."""
    cfg = config_from_dict(config["cfg"])
    options = LoopOptions(**config["options"])
    stage = cfg.stage1 if options.stage == 1 else cfg.stage2
    rank = start_worker(stage)
    device = worker_device()
    stage_model, optimizer, scheduler, state = _restore(cfg, options, stage, device)
    log = MetricsLog(Path(options.run_dir), enabled=rank == 0)
    log.start(options.stage, stage_model.trainable, stage_model.total, state.step, stage.steps)
    compile_decoder_layers(stage_model.model.lm, stage, device)
    model = ray.train.torch.prepare_model(stage_model.model, move_to_device=False) if ray.train.get_context(
    ).get_world_size() > 1 else stage_model.model
    collate = Collator(stage_model.tokenizer, options.num_patches, stage_model.image_end_id, cfg.data.max_length,
                       cfg.data.caption_prompt)
    batches = iterate_length_batches(ray.train.get_dataset_shard("train"), collate, stage.batch_size,
                                     stage.length_window, state, stage.seed)
    autocast = use_autocast(stage, device)
    reporter = StepReporter(stage, log, scheduler,
                            lambda d: save_training_state(d, stage_model.model, optimizer, scheduler, state, cfg))

    def print_due_samples() -> None:
        if rank == 0 and stage.sample_every and state.step % stage.sample_every == 0:
            with torch.compiler.set_stance("force_eager"):  # generation's cached shapes would compile a second graph
                print_samples(stage_model, config.get("samples", []), options, state.step, device)

    started_at, losses, data = state.step, [], hashlib.sha256()
    while state.step < stage.steps:
        started = time.perf_counter()
        state.epoch, index, batch = next(batches)
        data_wait_s = time.perf_counter() - started
        data.update(batch.input_ids.cpu().numpy().tobytes())
        batch = _to_device(batch, device)
        _maybe_fail(options, state.step + 1)
        loss, n_targets = train_step(model, batch, optimizer, scheduler, autocast, device)
        losses.append(loss)
        reporter.finish(state, index, loss, started, {"tokens": int(batch.attention_mask.sum())},
                        {"target_tokens": n_targets, "data_wait_s": data_wait_s}, print_due_samples)
    _record_worker(options, stage_model, started_at, state.step, losses, data)
