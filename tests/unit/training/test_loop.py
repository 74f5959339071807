"""Stage 1-2 loop helpers that need no Ray cluster: the bf16 autocast decision."""

import dataclasses

import torch

from trimodal.config import load_config
from trimodal.hardware import native_bf16
from trimodal.training.step import use_autocast


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

