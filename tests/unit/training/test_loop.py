"""Stage 1-2 loop helpers that need no Ray cluster: the bf16 autocast and layer compile decisions."""

import dataclasses

import pytest
import torch

from trimodal.config import load_config
from trimodal.hardware import native_bf16
from trimodal.models.chat import IGNORE_INDEX, IMAGE_TOKEN_ID
from trimodal.runs import RunInfo
from trimodal.training.collate import Batch
from trimodal.training.policies import param_groups, stage2_model
from trimodal.training.step import compile_decoder_layers, compiler_missing, train_step, use_autocast


def test_autocast_only_when_asked_for():
    stage = load_config("test").stage1
    assert not use_autocast(dataclasses.replace(stage, autocast_bf16=False), "cpu")


def test_autocast_falls_back_to_float32_without_native_bf16(monkeypatch, capsys):
    """A laptop CPU without AMX/AVX512-BF16 would emulate bf16 slower than fp32: the loop says so and uses fp32."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    stage = dataclasses.replace(load_config("test").stage1, autocast_bf16=True)
    assert not native_bf16("cpu")
    assert not use_autocast(stage, "cpu")
    assert "no native bfloat16: training in float32" in capsys.readouterr().out


def test_autocast_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    stage = dataclasses.replace(load_config("test").stage1, autocast_bf16=True)
    assert use_autocast(stage, "cpu")



def test_layers_compile_only_when_asked_for():
    cfg = load_config("test")
    sm = stage2_model(cfg, vision_dim=32, init=RunInfo(None, None, False), quantize=False)
    assert not compile_decoder_layers(sm.model.lm, cfg.stage2, "cpu")
    assert all(layer._compiled_call_impl is None for layer in sm.model.lm.get_decoder().layers)


def test_compile_falls_back_to_eager_without_a_compiler(monkeypatch, capsys):
    """A machine without a C++ compiler trains eager, and the log says why."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    cfg = load_config("test", {"stage2.compile_layers": True})
    sm = stage2_model(cfg, vision_dim=32, init=RunInfo(None, None, False), quantize=False)
    assert not compile_decoder_layers(sm.model.lm, cfg.stage2, "cpu")
    assert all(layer._compiled_call_impl is None for layer in sm.model.lm.get_decoder().layers)
    assert "no C++ compiler (/nonexistent/g++" in capsys.readouterr().out


def _batch(length: int, seed: int, patches: int = 4) -> Batch:
    """Two rows of `patches` image placeholders then text, the second row 3 tokens shorter, answers as targets."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (2, patches + length), generator=gen)
    ids[:, :patches] = IMAGE_TOKEN_ID
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -6:-3] = ids[:, -6:-3]
    return Batch(ids, mask, labels, torch.randn(2, patches, 32, generator=gen))


def _train(cfg, compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sm = stage2_model(cfg, vision_dim=32, init=RunInfo(None, None, False), quantize=False, num_patches=4)
    if compiled:
        assert compile_decoder_layers(sm.model.lm, cfg.stage2, "cpu")
    optimizer = torch.optim.AdamW(param_groups(sm.model, cfg.stage2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    losses = [train_step(sm.model, _batch(length, seed), optimizer, scheduler, False, "cpu")[0]
              for seed, length in enumerate((12, 9, 15))]
    if compiled:
        assert all(layer._compiled_call_impl is not None for layer in sm.model.lm.get_decoder().layers)
    return losses, {n: p.detach().clone() for n, p in sm.model.named_parameters()}


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing("cpu") is not None, reason="inductor needs a C++ compiler on CPU")
def test_compiled_layers_train_like_eager_ones():
    """Three stage-2 steps of different lengths give the same losses and weights, under the same parameter names
    (checkpoints and adapters are unchanged), with the decoder layers compiled or eager."""
    cfg = load_config("test", {"stage2.compile_layers": True})
    eager_losses, eager_weights = _train(cfg, compiled=False)
    compiled_losses, compiled_weights = _train(cfg, compiled=True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_weights.keys() == eager_weights.keys()
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)
