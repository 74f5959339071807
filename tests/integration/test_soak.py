"""The soak drill (scripts/drills/soak.py) at CI size: the `test` preset and two of its runs, served on 127.0.0.1 by
each engine in turn, get every bad-input case once and then 60 s of mixed traffic at concurrency 8 (text, image and
spoken questions, three-turn conversations, streams, some closed mid-stream, the other runs by `model`, the bad
cases again), in four 15 s windows, the first a warm-up. Asserted: no 5xx, every request answered, every 200 answer
valid under the openai client's schema and every bad input answered as the sweep expects, no replica restarted or
replaced, and per replica RSS and open-fd growth after the warm-up under bounds taken from longer runs (docs/drills.md).
The p95 drift check is printed, not asserted: over 15 s windows on a shared 2-core machine it measures the
neighbours. Media URLs go through the sweep's loopback-only sandbox, and the test checks that nothing reached it."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from trimodal.inference.media_fetch import read_attempts

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "drills"))

import bad_input_sweep  # noqa: E402
import drillkit  # noqa: E402
import soak  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SECONDS, WINDOW_S = 60.0, 15.0
BOUNDS = soak.Bounds(max_rss_growth_pct=10.0, max_fd_growth=8)
"""From the runs in docs/drills.md. No replica's fd count moved at all: 8 leaves room for sockets in flight. No
replica grew by more than 4.6% in 45 s (the Ingress, with its allocator settings, by 1.1% in 210 s): 10% is twice
the worst seen over the test's 45 s."""


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with drillkit.local_ray(num_cpus=8):
        yield


@pytest.fixture(scope="module")
def bad_cases():
    return bad_input_sweep.cases_for("test")


def run_soak(engine: str, runs_dir: Path, record: Path, bad_cases: list) -> soak.Soak:
    args = soak.server_args("test", "none", str(runs_dir), engine, {}, record)
    return soak.soak_engine(args, SECONDS, WINDOW_S, concurrency=8, bounds=BOUNDS, bad_cases=bad_cases)


def assert_soak_held(drill: soak.Soak, record: Path, bad_cases: list) -> None:
    windows = [drill.prime, *drill.windows]
    statuses = sum((Counter(w.statuses) for w in windows), Counter())
    assert drill.models == ["trimodal-test", "trimodal-test/base", "one", "two"]
    assert len(drill.windows) == 4 and drill.bad_cases == len(bad_cases)
    assert not [s for s in statuses if s[0] == "5" or s in ("none", "stream-error")], statuses
    # The mix was sent and answered: every kind at least once, counted by kind, not against a total that a slower
    # machine sends fewer of in the same seconds.
    answered = sum((Counter(w.answered) for w in windows), Counter())
    assert soak.VALID_KINDS <= set(answered) and sum(w.kinds.get("bad", 0) for w in drill.windows) >= 1, answered
    assert [w.unparsed for w in windows] == [0] * 5  # every 200 validated; every bad input answered as expected
    assert drill.windows[-1].restarts == 0
    assert {s.deployment for s in drill.windows[-1].replicas} == {"Ingress", "LanguageModel", "Speech", "Vision"}
    assert soak.growth_failures(drill.windows, BOUNDS) == []
    assert [f for f in drill.failures if not f.startswith("p95")] == []
    assert read_attempts(record) == []  # no media fetch reached even the loopback-only transport


def test_the_builtin_engine_soaks_without_errors_restarts_or_growth(ray_local, runs_dir, bad_cases, tmp_path):
    record = tmp_path / "fetch-attempts.jsonl"
    assert_soak_held(run_soak("builtin", runs_dir, record, bad_cases), record, bad_cases)


def test_the_vllm_engine_soaks_without_errors_restarts_or_growth(ray_local, runs_dir, bad_cases, tmp_path,
                                                                monkeypatch):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"the vllm environment is not installed ({VLLM_PYTHON} missing): run `make install-vllm`")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))  # the replica inherits these
    monkeypatch.setenv("TRIMODAL_CACHE", str(tmp_path / "trimodal-cache"))
    record = tmp_path / "fetch-attempts.jsonl"
    assert_soak_held(run_soak("vllm", runs_dir, record, bad_cases), record, bad_cases)
