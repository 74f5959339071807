"""Shared fixtures: tiny in-process models from the `test` preset (no downloads), and marker handling.

Under CI (the CI environment variable set, as `.ci/run` does) every test runs: a test that would skip because
something it needs is missing (the vllm environment, chromium, espeak-ng, ...) fails instead, with the skip's one
line saying what to install. Only gpu-marked tests still skip without CUDA: CI has no GPU by design.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray started by the suite sends no usage report, and binds every port to 127.0.0.1: Ray's single-node switch makes
# the node IP loopback (without it, Ray resolves 127.0.0.1 to the machine's address and binds GCS/raylet to it).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# No vLLM usage statistics and no Hugging Face telemetry from the suite or anything it starts (Ray, vllm_side.py).
os.environ.update(NO_TELEMETRY_ENV)

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none is visible (CI has none by design; run `pytest -m gpu` "
                                   "on a GPU node)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def skips_fail(item: pytest.Item) -> bool:
    """Whether a skip of this test is a failure: under CI (CI set, and not to false/0/no), for every test but a gpu
    one."""
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return in_ci and item.get_closest_marker("gpu") is None


def _fail_instead_of_skip(item: pytest.Item):
    """Run the wrapped phase; under CI a skip becomes a failure whose one line is the skip's reason."""
    try:
        return (yield)
    except pytest.skip.Exception as skipped:
        if not skips_fail(item):
            raise
        reason = skipped.msg
    pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)  # outside: no chained skip


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """Skips from markers (skipif) and fixtures (a missing environment) happen here."""
    return (yield from _fail_instead_of_skip(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Skips from the test body (pytest.skip, importorskip) happen here."""
    return (yield from _fail_instead_of_skip(item))


def pytest_sessionfinish(session, exitstatus):
    """Leave nothing running into interpreter exit: a Ray left initialised is shut down here, and threads still alive
    are named in the report (Ray's core worker is freed at shutdown; a thread that still uses it can crash the exit)."""
    import sys
    import threading

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        print("\n[conftest] Ray was still initialised at the end of the session; shutting it down", file=sys.stderr)
        ray.shutdown()
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if alive:
        print(f"\n[conftest] non-daemon threads alive at the end of the session: {alive}", file=sys.stderr)


def find_binary(name: str, package: str | None = None) -> str:
    """A program's path; when it is missing, skip (fail under CI) with one line naming the Debian package."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs `{name}` (Debian package {package or name}: apt-get install {package or name})")
    return path


@pytest.fixture(scope="session")
def require_binary():
    """`require_binary("chromium")`: find_binary for a test (the program's path, or skip / fail under CI)."""
    return find_binary


@pytest.fixture(scope="session")
def test_cfg():
    from trimodal.config import load_config

    return load_config("test")


@pytest.fixture(scope="session")
def tiny_lm(test_cfg):
    """(lm, tokenizer) of the test preset: a random 2-layer Llama and a byte-level tokenizer."""
    from trimodal.models.language import load_language_model

    lm, tok = load_language_model(test_cfg.model.language_model)
    return lm.eval(), tok


@pytest.fixture(scope="session")
def make_run(test_cfg, tiny_lm):
    """make_run(runs_dir, name, seed, adapter=True): a finished run of the test preset under runs_dir/name/final
    with its own projector (seeded) and, when asked, a LoRA adapter whose weights are random, not peft's
    do-nothing start, so each run answers differently from the base model and from the others."""
    import json
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from trimodal.models.language import build_random_lm
    from trimodal.models.projector import build_projector
    from trimodal.models.vision import random_vision_tower

    vision_dim = random_vision_tower(test_cfg.model.vision).info.hidden_size
    lm_cfg = test_cfg.model.language_model

    def make(runs_dir: Path, name: str, seed: int, adapter: bool = True) -> Path:
        final = Path(runs_dir) / name / "final"
        final.mkdir(parents=True)
        save_file(build_projector(vision_dim, lm_cfg.random_shape.hidden_size, seed).state_dict(),
                  str(final / "projector.safetensors"))
        if adapter:
            torch.manual_seed(seed)
            lm = build_random_lm(lm_cfg.random_shape, len(tiny_lm[1]))
            lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            get_peft_model(lm, lora).save_pretrained(final / "adapter")
        (final / "run.json").write_text(json.dumps({"preset": "test", "vision_tower": None}))
        return final

    return make


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, make_run):
    """A runs directory holding two finished runs of the test preset, `one` (seed 1) and `two` (seed 2)."""
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "one", 1)
    make_run(root, "two", 2)
    return root


@pytest.fixture(scope="session")
def load_job():
    """`load_job("preprocess")`: jobs/preprocess.py as a module, loaded the way `python jobs/preprocess.py` runs it
    (jobs/ first on sys.path), so a test calls its `main(argv)` in process."""
    def load(name: str):
        if str(JOBS) not in sys.path:
            sys.path.insert(0, str(JOBS))
        spec = importlib.util.spec_from_file_location(f"{name}_job", JOBS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
