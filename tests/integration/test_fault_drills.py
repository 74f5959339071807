"""The fault drills of scripts/drills/ at CI sizes, on one local Ray: a Ray Train worker, the CLIP encoder actor and
the LanguageModel replica are SIGKILLed mid-run (training resumes from its checkpoint, preprocessing keeps every
row, serving answers 503 + Retry-After and /readyz names the dead LanguageModel, then both recover), and the
bad-input sweep gets no 5xx, no restarts, every refusal for its expected reason, and no remote fetch attempted:
its server resolves media hosts from a table and fetches through a loopback-only transport that records every
attempt, so this module sends packets to loopback only even if the public-address check regressed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trimodal.inference.media_fetch import read_attempts

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


@dataclass
class Server:
    url: str
    media_record: Path
    """The sandbox transport's record of every media fetch it was asked to make."""


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory) -> Server:
    from ray import serve

    record = tmp_path_factory.mktemp("media") / "fetch-attempts.jsonl"
    env = {"TRIMODAL_ALLOWED_MEDIA_DOMAINS": bad_input_sweep.allowed_domains()}
    args = {**bad_input_sweep.SERVE_ARGS, **bad_input_sweep.sandbox_args(record)}
    yield Server(drillkit.start_serve(args, env=env), record)
    serve.shutdown()


@pytest.fixture
def steady_server(ray_local) -> str:
    """The drill's own server, whose LM answers at a steady pace (see serve_replica_kill.SERVE_ARGS)."""
    from ray import serve

    yield drillkit.start_serve(serve_replica_kill.SERVE_ARGS)
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


def test_a_killed_lm_replica_is_503_while_serve_replaces_it_and_retrying_clients_lose_nothing(steady_server):
    first, second = serve_replica_kill.run_drill(steady_server, clients=4, seconds=6, kill_after=2)
    for phase in (first, second):
        assert phase.new_pid and phase.new_pid != phase.killed_pid  # Serve started a new replica
        status, body = phase.readyz_after_kill
        assert status == 503 and "LanguageModel" in body["not_ready"], phase.readyz_after_kill  # not ready...
        assert phase.ready_s is not None and phase.chat_s is not None  # ...until it is, and answers again
        assert phase.retry_after <= {"1"}
    assert set(first.failures) <= {"503"}, first.failures  # never a 500
    # The kill reaches clients as 503s with Retry-After in one phase at least. Either phase may see none of its
    # requests fail: Serve holds a request that had not reached the replica until the replacement answers it.
    assert first.failures["503"] + second.attempts["503"] >= 1, (first.failures, second.attempts)
    assert "1" in first.retry_after | second.retry_after
    # Phase 2's clients retry a 503 for a budget scaled from phase 1's replacement time: every request succeeded,
    # however slow the machine.
    assert second.retry_budget_s >= first.chat_s
    assert second.sent > 0 and second.ok == second.sent and not second.failures


def test_bad_input_sweep_gets_no_5xx_no_restarts_and_refuses_for_the_right_reason(server):
    cases = bad_input_sweep.all_cases(limit=16 << 20)
    sweep = bad_input_sweep.run_sweep(server.url, cases, watch_server=True, media_record=server.media_record)
    statuses = {o.case.name: o.status for o in sweep.outcomes}
    assert len(sweep.outcomes) >= 50 and len(set(statuses)) == len(cases)
    assert not [o.case.name for o in sweep.outcomes if o.status is None or o.status >= 500], statuses
    assert not [o.case.name for o in sweep.outcomes if o.status not in o.case.expect], statuses
    reasons = [(o.case.name, o.message) for o in sweep.outcomes if o.wrong_reason]
    assert not reasons and sum(bool(o.case.reason) for o in sweep.outcomes) >= 20, reasons
    assert sweep.fetch_attempts == [] and not sweep.non_loopback_attempts  # refused before any connection
    assert sweep.restarts == 0 and sweep.still_serving


def test_the_sandbox_transport_records_and_refuses_what_reaches_it(server):
    """The control: a listed host the table resolves to a public address passes the check, so the transport is
    asked; it records the attempt and refuses it without a socket. The sweep's empty record therefore means that
    nothing reached the transport, not that nothing was recorded."""
    before = read_attempts(server.media_record)
    control = bad_input_sweep.control_fetch(server.url)
    assert control.status == 400 and not control.wrong_reason, control.message
    new = read_attempts(server.media_record)[len(before):]
    assert [(a["host"], a["allowed"]) for a in new] == [(bad_input_sweep.CONTROL_ADDRESS, False)]
