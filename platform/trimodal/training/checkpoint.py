"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint directory holds:
  projector.safetensors   the projector weights
  adapter/                the peft LoRA adapter (stage 2)
  optimizer.safetensors   optimizer tensors, + optimizer.json for its scalars and param groups
  scheduler.json          LR scheduler state
  rng.safetensors         torch CPU (and CUDA) RNG state
  state.json              step, data position (epoch, batch within epoch), python RNG state
  config.yaml             the resolved config
"""

from __future__ import annotations

import json
import random
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trimodal.config import TrimodalConfig, save_config


@dataclass
class TrainState:
    """Where training is."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Passes over the data started."""
    batch_in_epoch: int = 0
    """Batches of the current epoch consumed."""


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order): equal only for equal weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """A module's state dict as safetensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def save_training_state(directory: Path, model, optimizer, scheduler, state: TrainState,
                        cfg: TrimodalConfig) -> None:
    """Write everything needed to continue training a MultimodalLM stage into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model.projector, directory / "projector.safetensors")
    if hasattr(model.lm, "peft_config"):
        model.lm.save_pretrained(str(directory / "adapter"))
    save_optimizer_state(directory, optimizer, scheduler, state, cfg)


def save_optimizer_state(directory: Path, optimizer, scheduler, state: TrainState, cfg: TrimodalConfig) -> None:
    """Optimizer, scheduler, RNG, step/data position and config (everything but the weights)."""
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps(meta))
    (directory / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, str(directory / "rng.safetensors"))
    py_state = random.getstate()
    (directory / "state.json").write_text(json.dumps(asdict(state) | {"python_rng": [py_state[0], list(py_state[1]),
                                                                                    py_state[2]]}))
    save_config(cfg, directory / "config.yaml")


def load_training_state(directory: Path, model, optimizer, scheduler) -> TrainState:
    """Restore projector, optimizer, scheduler and RNG from `directory` (the adapter is loaded by the policy)."""
    model.projector.load_state_dict(load_file(str(directory / "projector.safetensors")))
    return load_optimizer_state(directory, optimizer, scheduler)


def load_optimizer_state(directory: Path, optimizer, scheduler) -> TrainState:
    """Restore optimizer, scheduler, RNG and the step/data position."""
    meta = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
    rng = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    raw = json.loads((directory / "state.json").read_text())
    version, internal, gauss = raw.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return TrainState(**raw)
