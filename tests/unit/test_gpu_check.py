"""bench/gpu_check.py's pure parts: the bandwidth table, the Phi-2 byte counts behind the decode bound (checked
against real transformers models), the bound arithmetic, the table rows; and that it exits 2 without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the script is run as a file, not installed

import gpu_check  # noqa: E402
from gpu_check import PHI2, TINY, Row  # noqa: E402

PHI2_PARAMS = 2_874_055_680 - 94_371_840
"""Phi-2's own parameters: the seed recipe's stage-2 total less its trainable LoRA + projector (DESIGN.md)."""


@pytest.mark.parametrize("name, tbs", [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-40GB", 1.555), ("NVIDIA A100-PCIE-40GB", 1.555), ("NVIDIA A100-SXM4-80GB", 2.039),
    ("NVIDIA A100 80GB PCIe", 1.935),
])
def test_bandwidth_by_cuda_device_name(name, tbs):
    found, source = gpu_check.bandwidth_for(name)
    assert found == tbs and "datasheet" in source


def test_an_unknown_gpu_has_no_bandwidth():
    assert gpu_check.bandwidth_for("Tesla T4") is None


def _phi(shape) -> torch.nn.Module:
    from transformers import PhiForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        return PhiForCausalLM(gpu_check.phi_config(shape, eos_id=0))


@pytest.mark.parametrize("shape", [PHI2, TINY], ids=["phi2", "tiny"])
def test_param_count_is_that_of_a_real_phi(shape):
    assert gpu_check.phi_param_count(shape) == sum(p.numel() for p in _phi(shape).parameters())


def test_phi2_shape_has_phi2s_parameter_count_and_rotary_dims():
    assert gpu_check.phi_param_count(PHI2) == PHI2_PARAMS
    config = gpu_check.phi_config(PHI2, eos_id=50256)
    head_dim = config.hidden_size // config.num_attention_heads
    assert head_dim == 80 and int(config.rope_parameters["partial_rotary_factor"] * head_dim) == 32


def test_decode_reads_every_weight_but_the_embedding_table():
    model = _phi(PHI2)
    embedding = model.get_input_embeddings().weight.numel()
    assert gpu_check.decode_weight_bytes(PHI2) == 2 * (PHI2_PARAMS - embedding)


def test_kv_bytes_per_token_match_a_real_bf16_cache():
    from transformers import PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(gpu_check.phi_config(TINY, eos_id=0)).to(torch.bfloat16).eval()
    tokens = 7
    with torch.no_grad():
        cache = model(torch.randint(0, 100, (1, tokens)), use_cache=True).past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    cached = sum(t.numel() * t.element_size() for pair in layers for t in pair)
    assert cached == tokens * gpu_check.kv_bytes_per_token(TINY)


def test_bound_is_bandwidth_over_bytes_read_per_step():
    # one sequence, no KV: 1 TB/s over 1 GB of weights is 1000 steps/s, one token each
    assert gpu_check.bound_tokens_per_s(1, 1.0, 10**9, 0, 0) == pytest.approx(1000)
    # 32 sequences of 1000 tokens at 1 MB/token: 4 GB + 32 GB read per step
    assert gpu_check.bound_tokens_per_s(32, 2.0, 4 * 10**9, 10**6, 1000) == pytest.approx(32 * 2e12 / 36e9)


def test_batching_raises_the_bound_less_than_linearly_when_kv_is_read():
    args = (3.35, gpu_check.decode_weight_bytes(PHI2), gpu_check.kv_bytes_per_token(PHI2), 208)
    one, many = gpu_check.bound_tokens_per_s(1, *args), gpu_check.bound_tokens_per_s(32, *args)
    assert one < many < 32 * one


def test_part_budget_keeps_the_reserve_and_the_cap():
    assert gpu_check.part_budget(now=0, deadline=480, cap_s=210, reserve_s=60) == 210
    assert gpu_check.part_budget(now=300, deadline=480, cap_s=210, reserve_s=60) == 120
    assert gpu_check.part_budget(now=470, deadline=480, cap_s=210, reserve_s=60) == 0


def test_vllm_rows_show_the_fraction_of_the_bound():
    rows = gpu_check.vllm_rows("eager", [{"concurrency": 8, "tokens_per_s": 500.0},
                                         {"concurrency": 32, "tokens_per_s": None}], PHI2, 3.35, 128)
    mean_context = gpu_check.PROMPT_TOKENS + gpu_check.SHORT_TOKENS + 64
    bound = gpu_check.bound_tokens_per_s(8, 3.35, gpu_check.decode_weight_bytes(PHI2),
                                         gpu_check.kv_bytes_per_token(PHI2), mean_context)
    assert rows[0].number == 500.0 and f"{500 / bound:.2f} of the bound {bound:.0f}" in rows[0].detail
    assert rows[1].value == "n/a" and rows[1].failed
    assert "bound" not in gpu_check.vllm_rows("eager", [{"concurrency": 1, "tokens_per_s": 9.0}], PHI2, None,
                                              128)[0].detail


def test_train_rows_compare_the_parameters_with_the_seed_recipe():
    measured = {"step_s": [0.5, 0.7, 0.6], "warmup": 2, "batch": 4, "length": 384, "targets": 167,
                "peak_bytes": 3 * 2**30, "loaded_bytes": 2**30, "trainable": 94_371_840, "total": 2_874_055_680,
                "load_s": 40.0, "losses": [10.9, 10.8], "step_source": "step: x"}
    step, peak, params, _ = gpu_check.train_rows(measured)
    assert step.number == 0.6 and "median of 3 after 2 warm-up" in step.detail
    assert peak.value == "3.00 GiB"
    assert params.detail.startswith("matches")
    assert gpu_check.train_rows(measured | {"trainable": 1})[2].detail.startswith("differs")


def test_table_has_a_line_per_row_and_keeps_cells_apart():
    table = gpu_check.format_table([Row("train", "a|b", "1 s"), Row("vllm", "c", "2", detail="x\ny")])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == 5 for line in lines)
    assert "a/b" in lines[2] and "x y" in lines[3]


@pytest.mark.parametrize("output, summary", [
    ("...\n3 passed, 1 skipped in 12.01s\n", "3 passed, 1 skipped in 12.01s"),
    ("F\n==== 1 failed, 2 passed in 3.00s ====\n", "1 failed, 2 passed in 3.00s"),
    ("no such file\n", ""),
])
def test_pytest_summary(output, summary):
    assert gpu_check.pytest_summary(output) == summary


def test_exits_2_with_one_line_without_a_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine with one
    out = tmp_path / "table.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (done.stdout + done.stderr).strip() == "needs a CUDA GPU"
    assert not out.exists()
