"""The fault drills of scripts/drills/ at CI sizes, on one local Ray: a Ray Train worker, the CLIP encoder actor and
the LanguageModel replica are SIGKILLed mid-run (training resumes from its checkpoint, preprocessing keeps every
row, serving answers 503 + Retry-After then recovers), and the bad-input sweep gets no 5xx and no restarts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "drills"))

import bad_input_sweep  # noqa: E402
import drillkit  # noqa: E402
import preprocess_encoder_kill  # noqa: E402
import serve_replica_kill  # noqa: E402
import train_worker_kill  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with drillkit.local_ray(num_cpus=6):
        yield


@pytest.fixture(scope="module")
def server(ray_local) -> str:
    from ray import serve

    env = {"TRIMODAL_ALLOWED_MEDIA_DOMAINS": ",".join(bad_input_sweep.PRIVATE_HOSTS)}
    yield drillkit.start_serve(bad_input_sweep.SERVE_ARGS, env=env)
    serve.shutdown()


def test_training_resumes_from_the_checkpoint_after_its_worker_is_sigkilled(ray_local, tmp_path):
    drill = train_worker_kill.run_drill(tmp_path, steps=30, checkpoint_every=10, kill_at=12)
    assert drill.kill.pid and not drill.kill.error
    assert [a["step"] for a in drill.attempts][0] == 0 and len(drill.attempts) == 2
    assert drill.attempts[1]["pid"] != drill.kill.pid  # a new worker process
    assert 0 < drill.kill.committed <= drill.resumed_from < drill.kill.step_before  # resumed, not restarted
    assert drill.resumed_from % 10 == 0 and drill.recomputed > 0
    assert drill.final_steps == 30 and drill.logged_steps == list(range(1, 31))


def test_preprocessing_keeps_one_row_per_good_image_after_the_encoder_is_sigkilled(ray_local, tmp_path):
    drill = preprocess_encoder_kill.run_drill(tmp_path, images=40, kill_after=8)
    assert drill.killed_pid and drill.images_at_kill >= 8
    assert drill.encoder_restarts >= 1 and drill.killed_pid not in drill.encoder_pids
    assert sorted(drill.written_ids) == sorted(drill.good_ids)  # none missing, none twice
    assert set(drill.skipped) == set(drill.bad)  # the broken images are reported, each once


def test_a_killed_lm_replica_is_503_while_serve_replaces_it_and_retrying_clients_lose_nothing(server):
    first, second = serve_replica_kill.run_drill(server, clients=4, seconds=6, kill_after=2)
    for phase in (first, second):
        assert phase.new_pid and phase.new_pid != phase.killed_pid  # Serve started a new replica
        assert phase.healthz_s is not None and phase.chat_s is not None  # and answers again
        assert phase.retry_after <= {"1"}
    assert first.sent > 0 and set(first.failures) <= {"503"}, first.failures  # never a 500
    assert second.sent > 0 and second.ok == second.sent and not second.failures


def test_bad_input_sweep_gets_no_5xx_and_no_restarts(server):
    cases = bad_input_sweep.all_cases(limit=16 << 20)
    sweep = bad_input_sweep.run_sweep(server, cases, watch_server=True)
    statuses = {o.case.name: o.status for o in sweep.outcomes}
    assert len(sweep.outcomes) >= 50 and len(set(statuses)) == len(cases)
    assert not [o.case.name for o in sweep.outcomes if o.status is None or o.status >= 500], statuses
    assert not [o.case.name for o in sweep.outcomes if o.status not in o.case.expect], statuses
    assert sweep.restarts == 0 and sweep.still_serving
