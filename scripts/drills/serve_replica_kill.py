"""Fault drill: SIGKILL the LanguageModel replica under steady load over real HTTP; Serve starts a new one.

Phase 1: `--clients` threads send chat completions with the official openai client and no retries for
`--seconds` (or until 3 s after recovery, if later); after `--kill-after` seconds the LanguageModel replica's
process (found with the Ray state API) gets SIGKILL. Prints requests sent, succeeded, failed, the status codes
of the failures, what /readyz answered right after the kill (503 naming the LanguageModel), and seconds from the
kill until /readyz answers 200 and a real chat completion answers again.
Phase 2: the same with clients that retry a 503 or a lost connection (waiting what Retry-After says) for a time
budget, not a count: `--retry-factor` times the seconds phase 1 measured from the kill until a chat completion
answered again (at least `--min-retry-s`). A machine slow enough to stretch the replacement stretches the budget with
it, so nothing is lost however slow the machine.

    python scripts/drills/serve_replica_kill.py                  # test preset, about a minute on 2 cores
    python scripts/drills/serve_replica_kill.py --clients 4 --seconds 20 --kill-after 5 --retry-factor 3
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from drillkit import actors, local_ray, print_table, start_serve, wait_for

SERVE_ARGS = {"preset": "test", "run": "none", "threads": 1, "test_token_delay_s": 0.05}
"""The LM answers at a steady 0.05 s a token (16 tokens: 0.8 s a request), so at the kill the clients' requests are
inside the LanguageModel, whatever the machine: without it a tiny model answers in milliseconds, requests spend
most of their time outside the replica, and whether the kill catches one in flight is left to chance."""
MODEL = "trimodal-test"
MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]
LM_REPLICA = "ServeReplica:main:LanguageModel"
RETRIED_STATUSES = {503}
"""What a retrying client tries again: the ingress's answer while the LanguageModel is being replaced."""
RETRY_WAIT_S = 0.5
"""The wait before retrying a lost connection, or a 503 without Retry-After."""
RECOVERY_TIMEOUT_S = 180
"""The longest wait for recovery after a kill; also phase 2's retry budget when phase 1 never saw recovery."""


@dataclass
class Phase:
    """What one phase of load saw."""

    retry_budget_s: float
    """How long after its first attempt a request may still be retried (0: never retried)."""
    sent: int = 0
    ok: int = 0
    failures: Counter = field(default_factory=Counter)
    """Failed requests by status code (or connection/timeout)."""
    attempts: Counter = field(default_factory=Counter)
    """Every HTTP response the clients got, retries included, by status code."""
    retry_after: set = field(default_factory=set)
    """Retry-After values seen on 503s."""
    retried: int = 0
    """Retries made, all requests together."""
    longest_retrying_s: float = 0.0
    """The longest a request spent from its first attempt to its last retry."""
    killed_pid: int = 0
    new_pid: int = 0
    readyz_after_kill: tuple[int, dict] = (0, {})
    """/readyz's status and JSON body right after the kill."""
    ready_s: float | None = None
    chat_s: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def openai_client(url: str, phase: Phase):
    """An openai client whose every HTTP response (retries too) is counted in `phase.attempts`."""
    from openai import OpenAI

    def seen(response: httpx.Response) -> None:
        with phase.lock:
            phase.attempts[str(response.status_code)] += 1
            if response.status_code == 503:
                phase.retry_after.add(response.headers.get("retry-after"))

    http = httpx.Client(timeout=60, event_hooks={"response": [seen]})
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)  # retries: ours


def attempt(client) -> tuple[str | None, float | None]:
    """One chat completion: (None or what failed, seconds to wait before retrying it; None: not retried)."""
    import openai

    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
        return None, None
    except openai.APIStatusError as exc:
        if exc.status_code not in RETRIED_STATUSES:
            return str(exc.status_code), None
        return str(exc.status_code), float(exc.response.headers.get("retry-after") or RETRY_WAIT_S)
    except openai.APITimeoutError:
        return "timeout", RETRY_WAIT_S
    except openai.APIConnectionError:
        return "connection error", RETRY_WAIT_S


def one_request(client, phase: Phase) -> None:
    """Send one chat completion, retried while the phase's budget allows, and record its outcome."""
    first = time.monotonic()
    retried = 0
    outcome, wait_s = attempt(client)
    while outcome is not None and wait_s is not None and time.monotonic() + wait_s - first <= phase.retry_budget_s:
        time.sleep(wait_s)
        retried += 1
        outcome, wait_s = attempt(client)
    with phase.lock:
        phase.sent += 1
        phase.ok += outcome is None
        phase.retried += retried
        if retried:
            phase.longest_retrying_s = max(phase.longest_retrying_s, time.monotonic() - first)
        if outcome is not None:
            phase.failures[outcome] += 1


def client_loop(url: str, phase: Phase, stop: threading.Event) -> None:
    """Send requests back to back until told to stop."""
    client = openai_client(url, phase)
    while not stop.is_set():
        one_request(client, phase)


def kill_lm_replica() -> int:
    """SIGKILL the LanguageModel replica's process; returns its pid."""
    replicas = actors(LM_REPLICA)
    if len(replicas) != 1:
        raise RuntimeError(f"expected one live {LM_REPLICA}, found {len(replicas)}")
    os.kill(replicas[0].pid, signal.SIGKILL)
    return replicas[0].pid


def readiness(url: str) -> tuple[int, dict]:
    """/readyz's status and JSON body."""
    response = httpx.get(url + "/readyz", timeout=30)
    return response.status_code, response.json()


def recovery_times(url: str, killed_at: float,
                   timeout_s: float = RECOVERY_TIMEOUT_S) -> tuple[float | None, float | None]:
    """Seconds from the kill until /readyz answers 200, and until a chat completion answers 200."""
    def ready() -> float | None:
        return time.monotonic() - killed_at if readiness(url)[0] == 200 else None

    def chat() -> float | None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
        ok = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        return time.monotonic() - killed_at if ok else None

    return wait_for(ready, timeout_s), wait_for(chat, timeout_s)


def run_phase(url: str, clients: int, seconds: float, kill_after: float, retry_budget_s: float) -> Phase:
    """Steady load, one replica kill, recovery timing; the load goes on until 3 s after recovery at least."""
    phase, stop = Phase(retry_budget_s), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(url, phase, stop), daemon=True) for _ in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(kill_after)
    phase.killed_pid = kill_lm_replica()
    killed_at = time.monotonic()
    phase.readyz_after_kill = readiness(url)
    phase.ready_s, phase.chat_s = recovery_times(url, killed_at)
    time.sleep(max(3.0, seconds - (time.monotonic() - start)))
    stop.set()
    for thread in threads:
        thread.join()
    replacement = wait_for(lambda: [a for a in actors(LM_REPLICA) if a.pid != phase.killed_pid], 60)
    phase.new_pid = replacement[0].pid if replacement else 0
    return phase


def report(title: str, phase: Phase) -> None:
    """Print a phase's figures."""
    codes = ", ".join(f"{code} x{n}" for code, n in sorted(phase.failures.items())) or "none"
    attempts = ", ".join(f"{code} x{n}" for code, n in sorted(phase.attempts.items()))
    print_table(title, [
        ("client retry budget, s", f"{phase.retry_budget_s:.1f}" if phase.retry_budget_s else "none"),
        ("retries made", phase.retried),
        ("longest a request kept retrying, s", f"{phase.longest_retrying_s:.1f}"),
        ("requests sent", phase.sent), ("succeeded", phase.ok), ("failed", phase.sent - phase.ok),
        ("failures by status", codes), ("HTTP responses incl. retries", attempts),
        ("Retry-After on 503s", ", ".join(sorted(str(v) for v in phase.retry_after)) or "-"),
        ("killed LanguageModel pid", phase.killed_pid), ("replacement pid", phase.new_pid or "none"),
        ("/readyz right after the kill", _readiness(phase.readyz_after_kill)),
        ("s until /readyz answers 200", _seconds(phase.ready_s)),
        ("s until a chat completion answers", _seconds(phase.chat_s))])


def _readiness(answer: tuple[int, dict]) -> str:
    status, body = answer
    return f"{status} {', '.join(body.get('not_ready', [])) or body.get('status', '')}"


def _seconds(value: float | None) -> str:
    return "never (timed out)" if value is None else f"{value:.1f}"


def retry_budget(first: Phase, factor: float, minimum_s: float) -> float:
    """Phase 2's retry budget: `factor` times how long phase 1's clients waited for the replacement (the kill until
    a chat completion answered), at least `minimum_s`; the recovery timeout if phase 1 never recovered."""
    if first.chat_s is None:
        return float(RECOVERY_TIMEOUT_S)
    return max(minimum_s, factor * first.chat_s)


def run_drill(url: str, clients: int, seconds: float, kill_after: float, retry_factor: float = 3.0,
              min_retry_s: float = 10.0) -> tuple[Phase, Phase]:
    """Both phases against a running server (Ray initialised in this process)."""
    first = run_phase(url, clients, seconds, kill_after, retry_budget_s=0)
    report("phase 1: replica killed, clients without retries", first)
    budget = retry_budget(first, retry_factor, min_retry_s)
    second = run_phase(url, clients, seconds, kill_after, retry_budget_s=budget)
    report(f"phase 2: replica killed, clients retrying for up to {budget:.1f} s "
           f"({retry_factor:g} x phase 1's {_seconds(first.chat_s)} s until answered, at least {min_retry_s:g} s)",
           second)
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="load per phase (longer if recovery is slow)")
    parser.add_argument("--kill-after", type=float, default=5.0, help="seconds of load before the kill")
    parser.add_argument("--retry-factor", type=float, default=3.0,
                        help="phase 2 retries for this many times phase 1's seconds from kill to answer")
    parser.add_argument("--min-retry-s", type=float, default=10.0, help="phase 2's shortest retry budget")
    args = parser.parse_args()
    from ray import serve

    with local_ray(num_cpus=4):
        url = start_serve(SERVE_ARGS)
        print(f"serving the test preset at {url}; {args.clients} clients, {args.seconds:g} s per phase")
        try:
            run_drill(url, args.clients, args.seconds, args.kill_after, args.retry_factor, args.min_retry_s)
        finally:
            serve.shutdown()


if __name__ == "__main__":
    main()
