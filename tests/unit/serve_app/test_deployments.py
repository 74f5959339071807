"""The plain deployment classes, no Ray: batched decoding equals one-at-a-time, a caller leaving cancels only its
row, image embeddings match the engine (also after the ingress shrinks a large image), speech transcribes."""

import asyncio
import copy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root

from serve_app.deployments import GenerationRequest, Job, LanguageModel, Speech, Vision  # noqa: E402
from serve_app.ingress import shrink_image  # noqa: E402
from trimodal.inference.engine import Delta  # noqa: E402
from trimodal.inference.generation import SamplingParams  # noqa: E402
from trimodal.models.chat import IMAGE_MARKER, Turn  # noqa: E402


@pytest.fixture(scope="module")
def lm(test_cfg):
    return LanguageModel(test_cfg, None)


@pytest.fixture(scope="module")
def vision(test_cfg):
    return Vision(test_cfg, None, test_cfg.model.language_model.random_shape.hidden_size)


def _request(text: str, max_tokens: int = 12, embeds=()) -> GenerationRequest:
    marker = IMAGE_MARKER * len(embeds)
    return GenerationRequest([Turn("user", marker + text)], list(embeds), SamplingParams(max_tokens=max_tokens))


async def _collect(agen) -> list:
    return [item async for item in agen]


def _answer(items: list[dict]) -> tuple[str, str]:
    return "".join(i.get("text", "") for i in items[1:]), items[-1]["finish_reason"]


async def _decode_all(lm: LanguageModel, jobs: list[Job]) -> tuple[list[str], list[str]]:
    texts, reasons = [""] * len(jobs), [""] * len(jobs)
    async for step in lm.decode_batch(jobs):
        for row, deltas in enumerate(step):
            if deltas is StopIteration:
                continue
            for d in deltas:
                texts[row] += d.text
                reasons[row] = d.finish_reason or reasons[row]
    return texts, reasons


def test_batched_decoding_equals_one_request_at_a_time(lm):
    requests = [_request("hello"), _request("What color is the square?", 20), _request("a", 7)]
    alone = [_answer(asyncio.run(_collect(lm.generate(r)))) for r in requests]
    jobs = [Job(lm.prepare(r), r.params) for r in requests]
    texts, reasons = asyncio.run(_decode_all(lm, jobs))
    assert list(zip(texts, reasons)) == alone
    assert all(reason in ("stop", "length") for reason in reasons)


def test_generate_streams_prompt_tokens_then_text_then_a_finish(lm):
    items = asyncio.run(_collect(lm.generate(_request("hello", 9))))
    assert items[0]["prompt_tokens"] == len(lm.prepare(_request("hello")).input_ids)
    assert all(i["finish_reason"] is None for i in items[1:-1]) and items[-1]["finish_reason"] in ("stop", "length")
    assert items[-1]["completion_tokens"] <= 9


def test_a_prompt_over_the_length_limit_is_an_error_item(lm):
    items = asyncio.run(_collect(lm.generate(_request("x" * 2000))))
    assert len(items) == 1 and "over the limit" in items[0]["error"]


class ScriptedGenerator:
    """TextGenerator's stream contract, scripted: every running row gets "x" per step, 200 steps, then "length";
    rows in `cancelled` stop at once and end with a "cancelled" delta."""

    def __init__(self, real):
        self.encode = real.encode

    def stream(self, prompts, params, cancelled):
        for step in range(1, 201):
            time.sleep(0.001)
            for row in range(len(prompts)):
                if row not in cancelled:
                    yield Delta(row, "x", "length" if step == 200 else None, step)
            if all(row in cancelled for row in range(len(prompts))):
                break
        for row in range(len(prompts)):
            if row in cancelled:
                yield Delta(row, "", "cancelled", 0)


@pytest.fixture
def scripted(lm):
    twin = copy.copy(lm)
    twin.generator = ScriptedGenerator(lm.generator)
    twin.counters = dict.fromkeys(lm.counters, 0)
    return twin


def test_a_caller_that_leaves_cancels_its_row_and_the_others_finish(scripted):
    jobs = [Job(scripted.prepare(_request("a")), SamplingParams()) for _ in range(2)]

    async def leave_early() -> tuple[list, list]:
        first, second = [], []
        async for step in scripted.decode_batch(jobs):
            first.append(step[0])
            second.extend(step[1] if step[1] is not StopIteration else [])
            if len(first) == 3:
                jobs[0].cancelled = True  # what LanguageModel.generate does when its caller goes away
        return first, second

    first, second = asyncio.run(leave_early())
    assert first[3] is StopIteration and all(step is StopIteration for step in first[3:])
    assert sum(len(step) for step in first[:3]) < 20  # row 0 stopped early
    assert len(second) == 200 and second[-1].finish_reason == "length"  # the other row ran to its own end


def test_closing_the_stream_cancels_the_row(scripted):
    async def close_after_first_text() -> None:
        gen = scripted.generate(_request("a"))
        assert "prompt_tokens" in await gen.__anext__()
        assert (await gen.__anext__())["text"].startswith("x")
        await gen.aclose()

    asyncio.run(close_after_first_text())
    assert scripted.stats()["cancelled"] == 1 and scripted.stats()["active"] == 0
    items = asyncio.run(_collect(scripted.generate(_request("a"))))
    assert _answer(items) == ("x" * 200, "length") and scripted.stats()["cancelled"] == 1


def test_images_become_lm_space_embeddings_matching_the_engine(vision, test_cfg):
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    embed = asyncio.run(vision.encode(img))
    assert embed.dtype == np.float32
    assert embed.shape == (vision.describe()["num_patches"], test_cfg.model.language_model.random_shape.hidden_size)
    direct = vision.encoder([img])[0].numpy()
    np.testing.assert_allclose(embed, direct, atol=1e-6)
    info = vision.describe()
    assert info["projector_trained"] is False and info["vision_tower_untrained"] is True


def test_shrinking_a_large_image_keeps_its_embeddings(vision):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8))
    small = shrink_image(big, vision.describe()["image_size"])
    assert min(small.size) == 64 and shrink_image(small, 64) is small
    torch.testing.assert_close(vision.encoder([small]), vision.encoder([big]))


def test_speech_transcribes_a_batch_and_silence_is_empty(test_cfg):
    speech = Speech(test_cfg)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    texts = asyncio.run(speech.transcribe_batch([np.zeros(16000, np.float32), tone]))
    assert texts[0] == "" and isinstance(texts[1], str)
    assert asyncio.run(speech.transcribe(np.zeros(8000, np.float32))) == ""
