"""Parity of the vllm engine with the builtin one: greedy float32 ids and completions of the `test` preset's tiny
Llama (2 heads: vLLM's CPU attention needs a head size of at least 32) for a text prompt, an image prompt, a batch,
stop strings, max_tokens, and a mixed batch of base rows and rows of two different LoRA adapters.

This process runs the builtin engine (.venv); `vllm_side.py` runs the vllm engine in `.venv-vllm` (make
install-vllm; CI installs it) on the same prompts, in one engine for all cases, and writes what it generated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trimodal.config import load_config
from trimodal.inference.engine import Prompt, TextGenerator, tokenize_prompt
from trimodal.inference.generation import decode_steps
from trimodal.inference.requests import SamplingParams
from trimodal.models.chat import IMAGE_MARKER, Turn
from trimodal.models.language import load_language_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
OVERRIDES = {"model.language_model.random_shape.num_heads": 2, "serving.vllm.max_loras": 3}  # two adapters + base
QUESTIONS = ["What is the capital of France?", "x", "a much longer question about shapes and colours", "count"]


def _cfg():
    return load_config("test", OVERRIDES)


def _generator(adapter: Path | None = None) -> TextGenerator:
    cfg = _cfg()
    lm, tok = load_language_model(cfg.model.language_model)
    if adapter is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(adapter))
    lm.eval().requires_grad_(False)
    return TextGenerator(lm, tok, image_end_id=tok.eos_token_id)


def _make_adapter(path: Path, seed: int) -> Path:
    """A LoRA adapter of the tiny model with random (non-zero) B matrices, saved with peft."""
    from peft import LoraConfig, get_peft_model

    cfg = _cfg()
    lm, _ = load_language_model(cfg.model.language_model)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(lm, lora).save_pretrained(str(path))
    return path


def _text_prompt(gen: TextGenerator, question: str) -> Prompt:
    return Prompt(gen.encode([Turn("user", question)], 0), None)


def _image_prompt(gen: TextGenerator, image: torch.Tensor) -> Prompt:
    return tokenize_prompt(gen, [Turn("user", IMAGE_MARKER + "What color is the shape?")], image)


def _ids(gen: TextGenerator, prompts: list[Prompt], params: list[SamplingParams]) -> list[list[int]]:
    """Greedy ids of the builtin decoder, EOS included as its id, as vLLM reports them."""
    out: list[list[int]] = [[] for _ in prompts]
    eos = next(iter(gen.eos_ids))
    for step in decode_steps(gen.lm, [gen.embed(p) for p in prompts], params, gen.eos_ids):
        for row, token in step.tokens:
            out[row].append(eos if token == -1 else token)
    return out


def _completions(gen: TextGenerator, prompts, params) -> list[dict]:
    return [{"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens,
             "prompt_tokens": c.prompt_tokens} for c in gen.generate(prompts, params)]


def _case(prompts: list[Prompt], params: list[SamplingParams], image_keys=None, adapters=None) -> dict:
    rows = [{"ids": p.input_ids, "image": (image_keys or [None] * len(prompts))[i]} for i, p in enumerate(prompts)]
    return {"prompts": rows, "params": [{"max_tokens": s.max_tokens, "stop": list(s.stop)} for s in params],
            "adapters": adapters}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """(what the builtin engine made, what the vllm engine made) for every case."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"the vllm environment is not installed ({VLLM_PYTHON} missing): run `make install-vllm`")
    tmp = tmp_path_factory.mktemp("vllm")
    base = _generator()
    adapters = {"one": _make_adapter(tmp / "one", 1), "two": _make_adapter(tmp / "two", 2)}
    tuned = {name: _generator(path) for name, path in adapters.items()}
    torch.manual_seed(0)
    image = torch.randn(1, 16, 64) * 0.2  # [n, N, H]: one projected 64 px image of 16 patches
    save_file({"img": image}, str(tmp / "images.safetensors"))

    texts = [_text_prompt(base, q) for q in QUESTIONS]
    greedy = [SamplingParams(max_tokens=24)]
    batch = [SamplingParams(max_tokens=n) for n in (16, 9, 12, 20)]
    stops = [SamplingParams(max_tokens=40, stop=(s,)) for s in ("e", "th", " ", "zz")]
    lengths = [SamplingParams(max_tokens=n) for n in (1, 2, 5, 0)]
    img = _image_prompt(base, image)
    cases = {"text": (base, [texts[0]], greedy), "image": (base, [img], greedy),
             "batch": (base, texts, batch), "stop": (base, texts, stops), "max_tokens": (base, texts, lengths)}
    expected = {name: {"ids": _ids(gen, p, s), "completions": _completions(gen, p, s)}
                for name, (gen, p, s) in cases.items()}
    spec_cases = {name: _case(p, s, ["img"] if name == "image" else None) for name, (_, p, s) in cases.items()}

    mixed_rows = [(None, texts[0]), ("one", texts[0]), ("two", texts[0]), (None, texts[2]), ("one", texts[2]),
                  ("two", img)]
    mixed_params = [SamplingParams(max_tokens=20)] * len(mixed_rows)
    expected["mixed_lora"] = {"ids": [], "completions": []}
    for name, prompt in mixed_rows:
        gen = tuned[name] if name else base
        expected["mixed_lora"]["ids"] += _ids(gen, [prompt], mixed_params[:1])
        expected["mixed_lora"]["completions"] += _completions(gen, [prompt], mixed_params[:1])
    spec_cases["mixed_lora"] = _case([p for _, p in mixed_rows], mixed_params,
                                     [("img" if p is img else None) for _, p in mixed_rows],
                                     [{"name": n, "path": str(adapters[n])} if n else None for n, _ in mixed_rows])
    spec = {"preset": "test", "overrides": OVERRIDES, "images": str(tmp / "images.safetensors"),
            "adapter_targets": ["q_proj", "v_proj", "o_proj"], "cases": spec_cases}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"), "TRIMODAL_CACHE": str(tmp / "trimodal-cache"),
           "PYTHONPATH": str(ROOT)}
    code, log = _run_side(env, tmp)
    assert code == 0, f"vllm side failed (exit status {code}):\n{log[-8000:]}"
    return expected, json.loads((tmp / "out.json").read_text()), mixed_rows


def _run_side(env: dict, tmp: Path, timeout_s: float = 900) -> tuple[int, str]:
    """Run vllm_side.py in its own process group; on timeout the whole group (vLLM's engine processes too) dies."""
    with open(tmp / "side.log", "w") as log:
        proc = subprocess.Popen([str(VLLM_PYTHON), str(ROOT / "tests/integration/vllm_side.py"),
                                 str(tmp / "spec.json"), str(tmp / "out.json")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -9
    return code, (tmp / "side.log").read_text()


@pytest.mark.parametrize("case", ["text", "image", "batch", "max_tokens"])
def test_greedy_ids_match_builtin(parity, case):
    expected, got, _ = parity
    assert got[case]["ids"] == expected[case]["ids"]
    assert got[case]["completions"] == expected[case]["completions"]
    assert any(len(ids) > 1 for ids in expected[case]["ids"]) or case == "max_tokens"


def test_stop_strings_end_answers_like_builtin(parity):
    expected, got, _ = parity
    assert got["stop"]["completions"] == expected["stop"]["completions"]
    assert any(c["finish_reason"] == "stop" for c in expected["stop"]["completions"])


def test_max_tokens_counts_and_finish_reasons(parity):
    _, got, _ = parity
    counts = [(c["completion_tokens"], c["finish_reason"]) for c in got["max_tokens"]["completions"]]
    assert all(n <= limit for (n, _), limit in zip(counts, (1, 2, 5))) and counts[3] == (0, "length")


def test_mixed_batch_of_base_rows_and_two_adapters_matches_builtin(parity):
    """Base rows that share a batch with adapter rows must not get an adapter (vLLM's CPU kernels gave them one
    when every LoRA slot was taken)."""
    expected, got, rows = parity
    assert got["mixed_lora"]["ids"] == expected["mixed_lora"]["ids"]
    assert got["mixed_lora"]["completions"] == expected["mixed_lora"]["completions"]
    ids = expected["mixed_lora"]["ids"]
    assert ids[0] != ids[1] and ids[0] != ids[2] and ids[1] != ids[2]  # the adapters change the answer
