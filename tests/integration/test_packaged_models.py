"""Real packaged weights (pinned in trimodal/weights/sources.py), loaded fully offline from pip packages."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trimodal.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2():
    from trimodal.models.language import load_language_model

    return load_language_model(load_config("cpu").model.language_model)


def test_smollm2_knows_the_capital_of_france(smollm2):
    lm, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_smollm2_chat_through_our_engine(smollm2):
    from trimodal.inference.engine import Prompt, TextGenerator
    from trimodal.inference.requests import SamplingParams
    from trimodal.models.chat import Turn

    lm, tok = smollm2
    gen = TextGenerator(lm, tok, image_end_id=5)
    prompt = Prompt(gen.encode([Turn("user", "What is the capital of France? Answer in one word.")], 0), None)
    result = gen.generate([prompt], [SamplingParams(max_tokens=16)])[0]
    assert "Paris" in result.text and result.finish_reason == "stop"


def test_cpu_preset_builds_all_its_models():
    from trimodal.runs import load_engine

    engine = load_engine(load_config("cpu", ["model.vision.source.name=/nonexistent/stage0"]))
    assert engine.generator.lm.config.model_type == "llama"
    info = engine.image_encoder.tower.info
    assert info.untrained and "UNTRAINED" in info.model_id  # stage 0 has not run for this path
    assert (info.num_patches, info.hidden_size) == (49, 256)
    assert not engine.image_encoder.trained
    assert engine.transcriber is not None
    feats = engine.image_encoder.tower(torch.zeros(1, 3, info.image_size, info.image_size))
    assert feats.shape == (1, 49, 256)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimodal", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_cli_answers_a_text_question():
    res = _cli("ask", "--preset", "cpu", "--max-tokens", "24", "What is the capital of France? One word.")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["ask", "--preset", "nope", "hi"], "'nope' is not one of cpu, phi2, test"),
    (["ask", "--preset", "test", "--image", "/no/such.png", "hi"], "image file not found: /no/such.png"),
    (["ask", "--preset", "test", "--image", "README.md", "hi"], "not a readable image"),
    (["transcribe", "--preset", "test", "/no/such.wav"], "audio file not found"),
])
def test_cli_errors_are_one_clear_line(args, message):
    res = _cli(*args)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("trimodal: error:") and message in lines[0], res.stderr
