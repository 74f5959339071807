"""The vllm side of the parity tests: run in `.venv-vllm` by tests/integration/test_vllm_engine.py.

    .venv-vllm/bin/python tests/integration/vllm_side.py SPEC.json OUT.json

SPEC names a preset + overrides, a safetensors file of image embeddings, and cases: prompts (token ids with image
placeholders, an optional image key), sampling settings and adapters. For each case all prompts go to one
VllmGenerator at once (vLLM batches them); OUT gets, per case, each row's completion and its raw token ids.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid


def _prompt(row: dict, images: dict):
    from trimodal.inference.engine import Prompt

    return Prompt(row["ids"], images[row["image"]] if row.get("image") else None)


async def _raw_ids(gen, prompt, params, adapter) -> list[int]:
    """The token ids vLLM generates for one prompt (EOS included when it ends on one)."""
    if params.max_tokens <= 0:
        return []  # vLLM refuses max_tokens 0; the engine answers it without asking vLLM
    engine = gen.start()
    embeds = gen.prompts.embed(prompt).to(gen.dtype)  # [T, H]
    ids: list[int] = []
    request = f"raw-{uuid.uuid4().hex}"
    async with gen.lease(adapter) as lora:
        async for out in engine.generate({"prompt_embeds": embeds}, gen._sampling(params), request,
                                         lora_request=lora):
            ids += list(out.outputs[0].token_ids)
    return ids


async def _case(gen, case: dict, images: dict) -> dict:
    from trimodal.inference.requests import SamplingParams
    from trimodal.inference.vllm_engine import AdapterRef

    prompts = [_prompt(row, images) for row in case["prompts"]]
    params = [SamplingParams(**p) for p in case["params"]]
    adapters = [AdapterRef(**a) if a else None for a in case.get("adapters") or [None] * len(prompts)]
    done = await gen.generate(prompts, params, adapters)
    raw = await asyncio.gather(*(_raw_ids(gen, p, s, a) for p, s, a in zip(prompts, params, adapters)))
    return {"completions": [{"text": c.text, "finish_reason": c.finish_reason,
                             "completion_tokens": c.completion_tokens, "prompt_tokens": c.prompt_tokens}
                            for c in done], "ids": list(raw)}


async def main(spec_file: str, out_file: str) -> None:
    from safetensors.torch import load_file

    from trimodal.config import load_config
    from trimodal.inference.vllm_engine import load_vllm_generator

    spec = json.loads(open(spec_file).read())
    cfg = load_config(spec["preset"], spec.get("overrides") or {})
    images = load_file(spec["images"]) if spec.get("images") else {}
    gen = load_vllm_generator(cfg, spec.get("adapter_targets") or ())
    try:
        results = {name: await _case(gen, case, images) for name, case in spec["cases"].items()}
    finally:
        gen.shutdown()
    with open(out_file, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":  # vLLM spawns its engine processes: nothing may run on import
    asyncio.run(main(sys.argv[1], sys.argv[2]))
