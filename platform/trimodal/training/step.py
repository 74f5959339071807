"""One optimizer step of stages 1 and 2, when it runs under bf16 autocast, and when its LM layers are compiled.
No Ray: the worker loop (`loop.py`), stage 0 (`clip.py`) and the benchmarks (`bench/train_step.py`,
`bench/gpu_check.py`) run the same step."""

from __future__ import annotations

import os
import shutil
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


def compiler_missing(device) -> str | None:
    """Why torch.compile's inductor cannot build kernels for `device` here (None: it can)."""
    if str(device).startswith("cuda"):
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}; set CXX to choose one)"


def compile_decoder_layers(lm: torch.nn.Module, stage: StageConfig, device) -> bool:
    """Compile each decoder layer of `lm` in place when the stage asks for it and inductor can build kernels here.

    One layer at a time, not the whole model: the layers share their code, so one graph (dynamic in batch and
    sequence length) serves all of them and compiles in well under a minute on 2 cores, and parameter names stay as
    they are (checkpoints and adapters are unchanged). Returns whether the layers were compiled.
    """
    if not stage.compile_layers:
        return False
    missing = compiler_missing(device)
    if missing:
        print(f"[train] compile_layers requested, but {missing}: the layers run eager", flush=True)
        return False
    for layer in lm.get_decoder().layers:
        layer.compile(dynamic=True)
    return True


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
