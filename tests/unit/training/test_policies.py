"""Stage policies: exactly which parameters train, with counts."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import PhiConfig, PhiForCausalLM

from trimodal.config import load_config
from trimodal.runs import RunInfo
from trimodal.models.projector import Projector
from trimodal.training.policies import count_parameters, stage1_model, stage2_model


def test_phi2_qlora_targets_give_the_recipes_trainable_count():
    """The capstone recipe this platform comes from (README, "What it is") printed 94,371,840 trainable of
    2,874,055,680 parameters for LoRA r=64 on Phi-2's six linears; the phi2 preset must give the same."""
    cfg = load_config("phi2")
    phi2 = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                     num_attention_heads=32, partial_rotary_factor=0.4)
    with torch.device("meta"):  # Phi-2's shapes without allocating or downloading 2.7B weights
        lm = PhiForCausalLM(phi2)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    peft_lm = get_peft_model(lm, lora)
    trainable, total = count_parameters(peft_lm)
    assert trainable == 94_371_840
    assert total == 2_874_055_680
    projector = Projector(640, 2560)
    assert sum(p.numel() for p in projector.parameters()) == 1_640_960 + 13_117_440


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_trains_only_the_projector(test_cfg):
    sm = stage1_model(test_cfg, vision_dim=32)
    names = _trainable_names(sm.model)
    assert names and all(n.startswith("projector.") for n in names)
    assert sm.trainable == sum(p.numel() for p in sm.model.projector.parameters())
    assert sm.total == sm.trainable + sum(p.numel() for p in sm.model.lm.parameters())


@pytest.mark.parametrize("quantize", [False, True])
def test_stage2_trains_lora_and_projector_only(quantize):
    cfg = load_config("test", {"quant.load_in_4bit": quantize})
    sm = stage2_model(cfg, vision_dim=32, init=RunInfo(None, None, False), quantize=quantize)
    names = _trainable_names(sm.model)
    lora = {n for n in names if "lora_" in n}
    assert names == lora | {n for n in names if n.startswith("projector.")}
    # r * (in + out) per adapted linear: q_proj and v_proj of 2 layers, hidden 64, r=4
    assert sum(p.numel() for n, p in sm.model.named_parameters() if n in lora) == 2 * 2 * 4 * (64 + 64)
    assert all(n.split(".")[-3] in ("lora_A", "lora_B") for n in lora)
    quantized = [p for p in sm.model.lm.parameters() if p.dtype == torch.uint8]
    assert bool(quantized) == quantize
