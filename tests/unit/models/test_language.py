"""Language-model loading: the configured attention kernel is the one the model runs."""

import pytest
import torch

from trimodal.config import load_config
from trimodal.models.language import load_language_model


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attention_kernel_follows_the_config(kernel):
    cfg = load_config("test", [f"model.language_model.attn_implementation={kernel}"])
    lm, _ = load_language_model(cfg.model.language_model)
    assert lm.config._attn_implementation == kernel


def test_eager_and_sdpa_compute_the_same_logits():
    """The CPU preset's eager kernel is a speed choice only: same masked logits as sdpa."""
    outputs = []
    for kernel in ("eager", "sdpa"):
        cfg = load_config("test", [f"model.language_model.attn_implementation={kernel}"])
        lm, _ = load_language_model(cfg.model.language_model)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
        with torch.no_grad():
            outputs.append(lm(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[0][1, :2], outputs[1][1, :2], rtol=1e-4, atol=1e-4)
