"""What the device runs natively, for choices that depend on it (bf16 autocast in training, the vllm engine's dtype)."""

from __future__ import annotations

import torch


def native_bf16(device) -> bool:
    """Whether `device` runs bfloat16 matmuls natively (CUDA with bf16, or a CPU with AMX or AVX512-BF16)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_dtype(name: str, device) -> str:
    """A configured dtype name, with `auto` made bfloat16 where `device` runs it natively and float32 elsewhere."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def pick_device(name: str) -> str:
    """A device name with `auto` made `cuda` where torch sees a CUDA device and `cpu` elsewhere.

    Only torch's own view counts: a Ray task granted a GPU resource on a node without a usable CUDA device (a fake
    cluster node, a broken driver) runs on the CPU.
    """
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"
