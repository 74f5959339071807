"""Usage statistics stay off everywhere the project starts vLLM or Ray: the vllm engine's start environment, the local
head (scripts/local_head.py's HEAD_ENV, which writes the settings out to avoid importing torch) and the shell the
demo and jobs run from (scripts/common.sh) all carry NO_TELEMETRY_ENV, and so does this suite (tests/conftest.py).
The running vllm replica is checked from inside in tests/integration/test_serve_vllm.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

from trimodal.config import load_config
from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV, engine_env

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_the_settings_turn_off_vllm_usage_statistics_and_hugging_face_telemetry():
    assert NO_TELEMETRY_ENV == {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_the_vllm_engine_starts_with_them():
    assert engine_env(load_config("test").serving.vllm).items() >= NO_TELEMETRY_ENV.items()


def test_the_local_head_starts_with_them():
    spec = importlib.util.spec_from_file_location("local_head", SCRIPTS / "local_head.py")
    local_head = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_head)
    assert local_head.HEAD_ENV.items() >= NO_TELEMETRY_ENV.items()


def test_the_demo_and_job_scripts_export_them():
    names = " ".join(NO_TELEMETRY_ENV)
    shell = f'source "$1" && for n in {names}; do echo "$n=${{!n-unset}}"; done'
    env = {k: v for k, v in os.environ.items() if k not in NO_TELEMETRY_ENV}
    out = subprocess.run(["bash", "-c", shell, "_", str(SCRIPTS / "common.sh")], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert dict(line.split("=", 1) for line in out.split()) == NO_TELEMETRY_ENV


def test_this_suite_runs_with_them():
    assert {name: os.environ.get(name) for name in NO_TELEMETRY_ENV} == NO_TELEMETRY_ENV
