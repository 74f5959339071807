"""Stage policies: exactly which parameters train, with counts."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import PhiConfig, PhiForCausalLM

from trimodal.config import load_config
from trimodal.runs import RunInfo
from trimodal.models.projector import Projector
from trimodal.training.policies import count_parameters, param_groups, stage1_model, stage2_model


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


@pytest.mark.parametrize("lora_lr", [None, 3e-4])
def test_stage2_trains_the_projector_at_lr_and_the_adapters_at_lora_lr(lora_lr):
    cfg = load_config("test", {"stage2.lr": 2e-3, "stage2.lora_lr": lora_lr})
    sm = stage2_model(cfg, vision_dim=32, init=RunInfo(None, None, False), quantize=False)
    groups = param_groups(sm.model, cfg.stage2)
    assert [g["lr"] for g in groups] == [2e-3, 2e-3 if lora_lr is None else lora_lr]
    names = {id(p): n for n, p in sm.model.named_parameters()}
    assert all(names[id(p)].startswith("projector.") for p in groups[0]["params"])
    assert groups[1]["params"] and all("lora_" in names[id(p)] for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(_trainable_names(sm.model))


def test_stage1_has_one_group_and_a_positioned_projector_when_the_preset_asks(test_cfg):
    cfg = load_config("test", {"model.projector_positions": True, "stage1.lora_lr": 1e-5})
    sm = stage1_model(cfg, vision_dim=32, num_patches=4)
    groups = param_groups(sm.model, cfg.stage1)
    assert len(groups) == 1 and groups[0]["lr"] == cfg.stage1.lr
    assert sm.model.projector.position.shape == (4, 32) and sm.model.projector.position.requires_grad
    with pytest.raises(ValueError, match="num_patches"):
        stage1_model(cfg, vision_dim=32)


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


def _tiny_phi() -> PhiForCausalLM:
    """Phi's architecture with Phi-2's residual dropout (resid_pdrop 0.1), a few hundred thousand weights."""
    torch.manual_seed(0)
    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       partial_rotary_factor=0.4, resid_pdrop=0.1, embd_pdrop=0.1)
    return PhiForCausalLM(config).requires_grad_(False)


def _loss(model) -> float:
    ids = torch.arange(1, 13).view(2, 6)  # [2, 6]
    loss, _ = model(ids, torch.ones_like(ids), None, ids)
    return float(loss)


def test_training_mode_keeps_the_frozen_lms_dropout_off():
    """Stage 1 and 2 put the model in training mode every step: the frozen LM's dropout must stay off (the same
    batch gives the same loss twice), while the projector trains in training mode."""
    from trimodal.models.multimodal import MultimodalLM

    model = MultimodalLM(_tiny_phi(), Projector(8, 32)).train()
    assert model.training and model.projector.training
    assert not any(m.training for m in model.lm.modules())
    assert _loss(model) == _loss(model)


def test_training_mode_keeps_lora_dropout_on_and_the_base_dropout_off():
    from trimodal.models.multimodal import MultimodalLM

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "fc1"], task_type="CAUSAL_LM")
    model = MultimodalLM(get_peft_model(_tiny_phi(), lora), Projector(8, 32)).train()
    lora_dropouts = [m for n, m in model.lm.named_modules() if n.endswith("lora_dropout.default")]
    assert lora_dropouts and all(m.training for m in lora_dropouts)
    base = [m for n, m in model.lm.named_modules() if n.endswith("resid_dropout") or n.endswith("embed_dropout")]
    assert base and not any(m.training for m in base)
    model.eval()
    assert not any(m.training for m in model.modules())


def _lora_grads(model) -> dict[str, bool]:
    ids = torch.arange(1, 13).view(2, 6)  # [2, 6]; text only: the first layer's input needs no grad
    model.zero_grad()
    model.train()
    loss, _ = model(ids, torch.ones_like(ids), None, ids)
    loss.backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in model.named_parameters() if "lora_B" in n}


def test_4bit_lora_keeps_its_gradients_after_a_no_grad_forward():
    """A sample print (a no-grad forward in eval mode) between steps must not turn a 4-bit layer into an
    inference-only kernel: every LoRA weight still gets a gradient on the next step."""
    cfg = load_config("test", {"quant.load_in_4bit": True})
    sm = stage2_model(cfg, vision_dim=32, init=RunInfo(None, None, False), quantize=True)
    torch.manual_seed(0)
    for n, p in sm.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # peft starts lora_B at zero; nonzero, every adapter passes a gradient on
    before = _lora_grads(sm.model)
    assert before and all(before.values()), before
    sm.model.eval()
    with torch.no_grad():
        sm.model(torch.arange(1, 7).view(1, 6), torch.ones(1, 6, dtype=torch.long), None, torch.arange(1, 7).view(1, 6))
    after = _lora_grads(sm.model)
    assert after == before
