import pytest
import torch

from trimodal.hardware import resolve_dtype

FEATURES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


@pytest.mark.parametrize(("native", "expected"), [(False, "float32"), (True, "bfloat16")])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_runs_it(monkeypatch, native, expected):
    for name in FEATURES:
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("float16", "cpu") == "float16"  # an explicit dtype is kept
    assert resolve_dtype("float32", "cpu") == "float32"
