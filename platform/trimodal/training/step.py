"""One optimizer step of stages 1 and 2, and when it runs under bf16 autocast. No Ray: the worker loop
(`loop.py`), stage 0 (`clip.py`) and the benchmarks (`bench/train_step.py`, `bench/gpu_check.py`) run the same step."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from trimodal.config import StageConfig
from trimodal.hardware import native_bf16
from trimodal.training.collate import Batch


def use_autocast(stage: StageConfig, device) -> bool:
    """bf16 autocast when the stage asks for it and the hardware runs it natively (emulated bf16 is slower)."""
    if not stage.autocast_bf16:
        return False
    if native_bf16(device):
        return True
    print(f"[train] autocast_bf16 requested, but {device} has no native bfloat16: training in float32", flush=True)
    return False


def bf16_autocast(enabled: bool, device) -> torch.autocast:
    """bfloat16 autocast on `device`'s type (a no-op context when not `enabled`)."""
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=enabled)


def train_step(model, batch: Batch, optimizer, scheduler, autocast: bool, device) -> tuple[float, int]:
    """One optimizer step; returns (loss, target tokens)."""
    model.train()
    with bf16_autocast(autocast, device):
        loss, n_targets = model(batch.input_ids, batch.attention_mask, batch.image_features, batch.labels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return optimizer_step(loss, trainable, optimizer, scheduler), n_targets


def optimizer_step(loss: torch.Tensor, params: Iterable[torch.Tensor], optimizer, scheduler) -> float:
    """Backward, clip the gradient norm of `params` to 1, step the optimizer and the schedule; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())
