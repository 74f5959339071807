"""The replica-kill drill's retrying clients (scripts/drills/serve_replica_kill.py) retry by time, not by count: a 503
or a lost connection is retried, after the Retry-After it names, until the phase's budget from the request's first
attempt runs out; any other error is final. Phase 2's budget comes from how long phase 1 waited for the replacement.
The server is a stand-in on 127.0.0.1 that answers 503 + Retry-After for the length of an outage, then a completion."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "drills"))

import serve_replica_kill as drill  # noqa: E402

COMPLETION = {"id": "c", "object": "chat.completion", "created": 0, "model": drill.MODEL,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}


class Outage(BaseHTTPRequestHandler):
    """503 with Retry-After until `until` (time.monotonic), then 200; `status` replaces 503 when set."""

    until = 0.0
    status = 503

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        down = time.monotonic() < self.until
        body = json.dumps({"error": {"message": "replica gone"}} if down else COMPLETION).encode()
        self.send_response(self.status if down else 200)
        if down:
            self.send_header("Retry-After", "0.2")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base URL, the handler class whose outage a test sets)."""
    handler = type("ThisOutage", (Outage,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def send(url: str, budget_s: float) -> drill.Phase:
    phase = drill.Phase(retry_budget_s=budget_s)
    drill.one_request(drill.openai_client(url, phase), phase)
    return phase


def test_without_a_budget_a_503_is_final(server):
    url, outage = server
    outage.until = time.monotonic() + 30
    phase = send(url, 0)
    assert (phase.ok, phase.retried, dict(phase.failures)) == (0, 0, {"503": 1})


def test_a_request_outlasts_an_outage_shorter_than_its_budget(server):
    url, outage = server
    outage.until = time.monotonic() + 1.0
    phase = send(url, 5.0)
    assert phase.ok == 1 and not phase.failures and phase.retried >= 2
    assert 1.0 <= phase.longest_retrying_s < 5.0 and phase.retry_after == {"0.2"}


def test_a_request_gives_up_when_its_budget_is_spent(server):
    url, outage = server
    outage.until = time.monotonic() + 30
    started = time.monotonic()
    phase = send(url, 1.0)
    assert dict(phase.failures) == {"503": 1} and phase.retried >= 2
    assert time.monotonic() - started < 3.0  # the budget, not the 30 s outage, ended it


def test_an_error_other_than_503_is_not_retried(server):
    url, outage = server
    outage.until, outage.status = time.monotonic() + 30, 500
    phase = send(url, 5.0)
    assert (phase.retried, dict(phase.failures)) == (0, {"500": 1})


def test_phase_2_budget_scales_with_phase_1_replacement_time():
    def measured(chat_s):
        first = drill.Phase(retry_budget_s=0)
        first.chat_s = chat_s
        return drill.retry_budget(first, factor=3, minimum_s=10)

    assert measured(2.0) == 10  # a fast machine: the floor
    assert measured(40.0) == 120  # ten times slower: ten times the budget
    assert measured(None) == drill.RECOVERY_TIMEOUT_S  # phase 1 never saw recovery
