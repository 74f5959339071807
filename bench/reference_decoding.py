"""The baseline decoder the KV cache is measured and checked against: greedy, one request, and the whole sequence
re-run for every new token (no cache), as the capstone project this platform grew from served its model.

`bench/serve.py` times it (its "seed" rows); tests/unit/inference/test_generation.py checks that KV-cache decoding
picks exactly its tokens.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_without_cache(lm, prompt: torch.Tensor, max_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy token ids after `prompt` [T, H] (inputs_embeds), re-running the whole sequence every token."""
    embed = lm.get_input_embeddings()
    seq = prompt.unsqueeze(0)  # [T, H] -> [1, T, H]
    tokens: list[int] = []
    for _ in range(max_tokens):
        logits = lm(inputs_embeds=seq, use_cache=False).logits[:, -1]
        token = int(logits.argmax(-1))
        if token in eos_ids:
            break
        tokens.append(token)
        new = embed(torch.tensor([[token]], device=seq.device)).to(seq.dtype)  # [1, 1, H]
        seq = torch.cat([seq, new], dim=1)
    return tokens
