import sys
from pathlib import Path

import torch

from trimodal.inference.engine import Prompt, TextGenerator
from trimodal.inference.generation import TextTracker, decode_steps
from trimodal.inference.requests import SamplingParams
from trimodal.models.chat import Turn

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))  # the no-cache baseline the benchmark times
from reference_decoding import greedy_without_cache  # noqa: E402


def _prompts(gen: TextGenerator, questions):
    return [Prompt(gen.encode([Turn("user", q)], 0), None) for q in questions]


def _tokens(gen, prompts, params):
    out = [[] for _ in prompts]
    for step in decode_steps(gen.lm, [gen.embed(p) for p in prompts], params, gen.eos_ids):
        for row, tok in step.tokens:
            if tok >= 0:
                out[row].append(tok)
    return out


def test_kv_cache_greedy_equals_full_reforward(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    for prompt in _prompts(gen, ["What is the capital of France?", "x"]):
        cached = _tokens(gen, [prompt], [SamplingParams(max_tokens=24)])[0]
        reference = greedy_without_cache(lm, gen.embed(prompt), 24, gen.eos_ids)
        assert len(cached) > 0
        assert cached == reference


def test_prefill_gives_the_last_positions_logits_in_bfloat16_too(tiny_lm):
    """The prefill asks the LM for its last position by index; in bfloat16 as in float32 those are the logits of a
    full forward's last position, for left-padded rows of different lengths."""
    import copy

    from trimodal.inference.generation import left_pad, prefill

    for dtype in (torch.float32, torch.bfloat16):
        lm = copy.deepcopy(tiny_lm[0]).to(dtype)
        torch.manual_seed(0)
        prompts = [torch.randn(n, lm.config.hidden_size, dtype=dtype) for n in (7, 3, 5)]
        state = prefill(lm, prompts)
        embeds, mask, positions = left_pad(prompts)
        with torch.no_grad():
            full = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1]  # [B, V]
        assert state.logits.shape == full.shape
        torch.testing.assert_close(state.logits, full)


def test_batched_left_padded_generation_equals_one_by_one(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    prompts = _prompts(gen, ["short", "a much longer question about shapes and colours", "medium length"])
    params = [SamplingParams(max_tokens=n) for n in (16, 9, 12)]
    batched = _tokens(gen, prompts, params)
    single = [_tokens(gen, [p], [s])[0] for p, s in zip(prompts, params)]
    assert batched == single
    assert all(len(b) > 0 for b in batched)


def test_max_tokens_finish_reason_and_stream_matches_generate(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    prompts = _prompts(gen, ["one", "two"])
    params = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=7)]
    done = gen.generate(prompts, params)
    assert [c.completion_tokens for c in done] == [5, 7]
    assert {c.finish_reason for c in done} == {"length"}
    streamed = ["", ""]
    for delta in gen.stream(prompts, params):
        streamed[delta.row] += delta.text
    assert streamed == [c.text for c in done]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    prompt = _prompts(gen, ["sample me"])
    hot = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = _tokens(gen, prompt, [hot])[0]
    b = _tokens(gen, prompt, [hot])[0]
    c = _tokens(gen, prompt, [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=8)])[0]
    assert a == b and a != c


def test_top_p_tiny_keeps_only_the_argmax(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    prompt = _prompts(gen, ["nucleus"])
    greedy = _tokens(gen, prompt, [SamplingParams(max_tokens=10)])[0]
    nucleus = _tokens(gen, prompt, [SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=1)])[0]
    assert nucleus == greedy


class _CharTok:
    """Decodes ids as characters: enough to test the text tracker."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_cut_the_text_and_are_held_back_while_streaming():
    tracker = TextTracker(_CharTok(), stop=["END"])
    shown = "".join(tracker.add(ord(c)) for c in "hello EN")
    assert shown == "hello "  # "EN" might start "END": held back
    assert tracker.add(ord("D")) == "" and tracker.stopped
    assert tracker.text == "hello "
    other = TextTracker(_CharTok(), stop=["END"])
    shown = "".join(other.add(ord(c)) for c in "ENx")
    assert shown + other.finish() == "ENx" and not other.stopped


def test_stop_string_ends_generation_early(tiny_lm):
    lm, tok = tiny_lm
    gen = TextGenerator(lm, tok, image_end_id=3)
    prompt = _prompts(gen, ["stop test"])
    full = gen.generate(prompt, [SamplingParams(max_tokens=20)])[0]
    stop = full.text[3:5]
    cut = gen.generate(prompt, [SamplingParams(max_tokens=20, stop=(stop,))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.completion_tokens < full.completion_tokens


def test_prompt_and_answer_stay_within_the_models_positions(tiny_lm):
    """A model reads max_position_embeddings positions (Phi-2: 2,048): a longer prompt is refused with a clear
    error, and an answer stops with finish_reason "length" where the positions end, whatever max_tokens asks."""
    import copy

    import pytest

    lm, tok = tiny_lm
    short = copy.deepcopy(lm)
    gen = TextGenerator(short, tok, image_end_id=3)
    prompt = _prompts(gen, ["one"])[0]
    short.config.max_position_embeddings = len(prompt.input_ids) + 6
    gen = TextGenerator(short, tok, image_end_id=3, max_length=4096)
    assert gen.max_length == len(prompt.input_ids) + 5
    done = gen.generate([prompt], [SamplingParams(max_tokens=50)])[0]
    assert (done.completion_tokens, done.finish_reason) == (6, "length")
    with pytest.raises(ValueError, match=r"over the limit of \d+ \(the model reads \d+ positions\)"):
        gen.encode([Turn("user", "a question much longer than the few positions left")], 0)


def test_the_serving_prompt_limit_leaves_phi2_room_to_answer():
    from trimodal.config import load_config
    from trimodal.inference.requests import prompt_token_limit

    cfg = load_config("phi2")
    assert prompt_token_limit(cfg) == 3072  # 8 x data.max_length 384: over Phi-2's 2,048 positions
    assert prompt_token_limit(cfg, 2048) == 2047
