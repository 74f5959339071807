"""The LanguageModel as a plain class, no Ray: batched decoding equals one-at-a-time, a caller leaving cancels only
its row, rows of different runs share a batch, and the test suite's SteadyGenerator stands in when asked."""

import asyncio
import copy
import dataclasses
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app and tests/support live at the repo root

from serve_app.language_model import BatchRow, LanguageModel  # noqa: E402
from serve_app.registry import run_bundle  # noqa: E402
from tests.support.steady_generator import SteadyGenerator  # noqa: E402
from trimodal.inference.engine import Delta  # noqa: E402
from trimodal.inference.requests import GenerationRequest, SamplingParams  # noqa: E402
from trimodal.models.chat import IMAGE_MARKER, Turn  # noqa: E402


@pytest.fixture(scope="module")
def lm(test_cfg):
    return LanguageModel(test_cfg, None)


def _request(text: str, max_tokens: int = 12, embeds=()) -> GenerationRequest:
    marker = IMAGE_MARKER * len(embeds)
    return GenerationRequest([Turn("user", marker + text)], list(embeds), SamplingParams(max_tokens=max_tokens))


async def _collect(agen) -> list:
    return [item async for item in agen]


def _answer(items: list[dict]) -> tuple[str, str]:
    return "".join(i.get("text", "") for i in items[1:]), items[-1]["finish_reason"]


async def _decode_all(lm: LanguageModel, rows: list[BatchRow]) -> tuple[list[str], list[str]]:
    texts, reasons = [""] * len(rows), [""] * len(rows)
    async for step in lm.decode_batch(rows):
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
    rows = [BatchRow(lm.prepare(r), r.params) for r in requests]
    batches, waits = lm.metrics.tallies["batches"], lm.metrics.tallies["queue_wait"]
    texts, reasons = asyncio.run(_decode_all(lm, rows))
    assert list(zip(texts, reasons)) == alone
    assert all(reason in ("stop", "length") for reason in reasons)
    assert lm.metrics.tallies["batches"] == batches + 1 and lm.metrics.tallies["queue_wait"] == waits + 3


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
    rows in `cancelled` stop at once and end with a "cancelled" delta. With a `gate`, each step first waits for
    the consumer to release it, so which deltas a caller sees depends on nothing but the order of events."""

    def __init__(self, real, gate: threading.Semaphore | None = None):
        self.encode = real.encode
        self.gate = gate

    def stream(self, prompts, params, cancelled, adapters=None):
        for step in range(1, 201):
            self._wait_for_the_gate(len(prompts), cancelled)
            for row in range(len(prompts)):
                if row not in cancelled:
                    yield Delta(row, "x", "length" if step == 200 else None, step)
            if all(row in cancelled for row in range(len(prompts))):
                break
        for row in range(len(prompts)):
            if row in cancelled:
                yield Delta(row, "", "cancelled", 0)

    def _wait_for_the_gate(self, rows: int, cancelled) -> None:
        """Until the consumer releases the next step, or every row is cancelled (then there is nothing to do)."""
        for _ in range(6000):
            if self.gate is None or all(r in cancelled for r in range(rows)) or self.gate.acquire(timeout=0.01):
                return
        raise TimeoutError("the test never released the next step")


def _scripted(lm, gate: threading.Semaphore | None = None) -> LanguageModel:
    twin = copy.copy(lm)
    twin.generator = ScriptedGenerator(lm.generator, gate)
    twin.counters = dict.fromkeys(lm.counters, 0)
    return twin


def test_a_caller_that_leaves_cancels_its_row_and_the_others_finish(lm):
    """Step k+1 is released only once row 1's delta of step k arrived; row 0 leaves after exactly 3 deltas."""
    gate = threading.Semaphore(1)
    gated = _scripted(lm, gate)
    rows = [BatchRow(gated.prepare(_request("a")), SamplingParams()) for _ in range(2)]

    async def leave_after_three() -> tuple[list, list]:
        first, second = [], []
        async for step in gated.decode_batch(rows):
            first.extend(step[0] if step[0] is not StopIteration else [])
            second.extend(step[1] if step[1] is not StopIteration else [])
            if len(first) == 3:
                rows[0].cancelled = True  # what LanguageModel.generate does when its caller goes away
            if step[1] is not StopIteration and step[1]:
                gate.release()  # row 1's delta of this step arrived: allow the next step
        return first, second

    first, second = asyncio.run(leave_after_three())
    assert [d.text for d in first] == ["x"] * 3  # row 0 got exactly the steps before it left
    assert len(second) == 200 and second[-1].finish_reason == "length"  # the other row ran to its own end


def test_closing_the_stream_cancels_the_row(lm):
    """Only step 1 is released: the caller leaves after its text, and the decoder has nothing else to do."""
    gate = threading.Semaphore(1)
    scripted = _scripted(lm, gate)

    async def close_after_first_text() -> None:
        gen = scripted.generate(_request("a"))
        assert "prompt_tokens" in await gen.__anext__()
        assert (await gen.__anext__())["text"] == "x"
        await gen.aclose()
        await asyncio.to_thread(scripted._executor.submit(lambda: None).result, 60)  # the decoder has ended

    asyncio.run(close_after_first_text())
    assert scripted.stats()["cancelled"] == 1 and scripted.stats()["active"] == 0
    gate.release(200)  # every step of the next answer
    items = asyncio.run(_collect(scripted.generate(_request("a"))))
    assert _answer(items) == ("x" * 200, "length") and scripted.stats()["cancelled"] == 1


def test_the_steady_generator_answers_max_tokens_whatever_the_model_and_stops_when_cancelled(test_cfg):
    steady = LanguageModel(test_cfg, None, test_token_delay_s=1e-6)
    assert isinstance(steady.generator, SteadyGenerator)
    items = asyncio.run(_collect(steady.generate(_request("hello", 40))))
    assert items[0]["prompt_tokens"] > 0 and _answer(items) == ("x" * 40, "length")
    prompt = steady.prepare(_request("hello"))
    deltas = list(steady.generator.stream([prompt, prompt], [SamplingParams(max_tokens=5)] * 2, {1}))
    assert [(d.row, d.text, d.finish_reason) for d in deltas] == [(0, "x", None)] * 4 + [
        (0, "x", "length"), (1, "", "cancelled")]
    with pytest.raises(ValueError, match="over the limit"):  # the real tokenizer and prompt limit
        steady.prepare(_request("x" * 2000))


def test_rows_of_different_runs_share_a_batch_and_each_answers_as_alone(test_cfg, tmp_path, make_run):
    lm = LanguageModel(test_cfg, None)
    one, two = (run_bundle(make_run(tmp_path, name, seed), name) for name, seed in (("one", 1), ("two", 2)))
    requests = [dataclasses.replace(_request(q, 16), run=run)
                for q, run in (("hello", None), ("hello", one), ("hello", two), ("a", one))]
    alone = [_answer(asyncio.run(_collect(lm.generate(r)))) for r in requests]
    rows = [BatchRow(lm.prepare(r), r.params, run=r.run) for r in requests]
    texts, reasons = asyncio.run(_decode_all(lm, rows))
    assert list(zip(texts, reasons)) == alone
    assert len({alone[0], alone[1], alone[2]}) == 3  # the control: base, one and two answer differently
    assert lm.stats()["adapters_loaded"] == 2


def test_the_replica_runs_and_reports_servings_dtype(test_cfg):
    """The test preset pins float32 (engine parity); bfloat16 asked is bfloat16 run and reported, not the LM's
    configured training dtype."""
    cfg = dataclasses.replace(test_cfg, serving=dataclasses.replace(test_cfg.serving, dtype="bfloat16"))
    replica = LanguageModel(cfg, None)
    assert replica.describe()["dtype"] == "bfloat16" and cfg.model.language_model.dtype == "float32"
    assert next(replica.generator.lm.parameters()).dtype == torch.bfloat16
    items = asyncio.run(_collect(replica.generate(_request("What color is the square?", max_tokens=4))))
    assert _answer(items)[1] in ("length", "stop")
    assert LanguageModel(test_cfg, None).describe()["dtype"] == "float32"
