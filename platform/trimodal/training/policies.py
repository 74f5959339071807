"""Stage policies: which parts are loaded how, and exactly which parameters train.

Stage 1: LM frozen (full precision), projector trained.
Stage 2: LM in 4-bit NF4 (bitsandbytes) with LoRA adapters (peft) on the preset's target modules, projector trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trimodal.config import StageConfig, TrimodalConfig
from trimodal.models.language import image_end_id, load_language_model
from trimodal.models.multimodal import MultimodalLM
from trimodal.runs import RunInfo, load_projector


@dataclass
class StageModel:
    """A model ready to train, with its tokenizer and parameter accounting."""

    model: MultimodalLM
    tokenizer: object
    image_end_id: int
    trainable: int
    """Number of trainable parameters."""
    total: int
    """Number of parameters (4-bit weights counted as their logical element count)."""


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); bitsandbytes packs two 4-bit values per byte, so count those twice."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _assemble(lm, cfg: TrimodalConfig, init: RunInfo, vision_dim: int, num_patches: int, device) -> MultimodalLM:
    if cfg.model.projector_positions and num_patches < 1:
        raise ValueError("model.projector_positions needs the tower's num_patches")
    projector, _ = load_projector(init, vision_dim, lm.config.hidden_size, cfg.model.projector_seed,
                                  cfg.model.projector_positions_for(num_patches))
    projector = projector.to(device).requires_grad_(True)
    return MultimodalLM(lm, projector)


def stage1_model(cfg: TrimodalConfig, vision_dim: int, device: str | torch.device = "cpu",
                 init: RunInfo | None = None, num_patches: int = 0) -> StageModel:
    """Frozen LM + trainable projector (for features [num_patches, vision_dim] per image)."""
    lm, tokenizer = load_language_model(cfg.model.language_model, device=device)
    lm.eval().requires_grad_(False)
    model = _assemble(lm, cfg, init or RunInfo(None, None, False), vision_dim, num_patches, device)
    trainable, total = count_parameters(model)
    return StageModel(model, tokenizer, image_end_id(cfg.model.language_model, tokenizer), trainable, total)


def keep_4bit_weights_trainable(lm: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, a Linear4bit that sees a no-grad input outside training mode (a sample print, or the
    frozen LM's first layer on a text-only batch, since the frozen LM stays in eval mode) repacks its weight for an
    inference kernel that has no gradient; every later forward, training included, then uses it, and the LoRA
    adapters on that layer silently stop getting gradients (bitsandbytes 0.50: torch only warns).
    """
    import bitsandbytes as bnb

    for module in lm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def stage2_model(cfg: TrimodalConfig, vision_dim: int, init: RunInfo, device: str | torch.device = "cpu",
                 quantize: bool = True, adapter_dir: Path | None = None, num_patches: int = 0) -> StageModel:
    """QLoRA LM (4-bit base + LoRA) + trainable projector initialised from the stage-1 run `init` (for features
    [num_patches, vision_dim] per image)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    quant = cfg.quant if quantize and cfg.quant.load_in_4bit else None
    lm, tokenizer = load_language_model(cfg.model.language_model, quant=quant, device=device)
    lm.requires_grad_(False)
    keep_4bit_weights_trainable(lm)
    if adapter_dir is not None:
        lm = PeftModel.from_pretrained(lm, str(adapter_dir), is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
        lm = get_peft_model(lm, lora)
    model = _assemble(lm, cfg, init, vision_dim, num_patches, device)
    trainable, total = count_parameters(model)
    return StageModel(model, tokenizer, image_end_id(cfg.model.language_model, tokenizer), trainable, total)


def param_groups(model: MultimodalLM, stage: StageConfig) -> list[dict]:
    """AdamW parameter groups of what trains: the projector at `stage.lr`, everything else (the LoRA adapters) at
    `stage.lora_lr` when it is set, else at `stage.lr` too."""
    projector = [p for p in model.projector.parameters() if p.requires_grad]
    mine = {id(p) for p in projector}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
    groups = [{"params": projector, "lr": stage.lr}]
    if rest:
        groups.append({"params": rest, "lr": stage.lr if stage.lora_lr is None else stage.lora_lr})
    return groups
