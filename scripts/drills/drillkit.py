"""Small helpers shared by the fault drills: a private local Ray, Serve on a free port, actor lookups, RSS, tables.

Every drill starts its own Ray on 127.0.0.1 (dashboard on a free port: the state API that finds actor pids needs
it) with token authentication off, like the test suite, and shuts down only what it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # serve_app lives at the repo root (Ray workers inherit the driver's sys.path)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Like the test suite (tests/conftest.py): no usage report, and Ray's single-node switch (loopback node IP).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.update(NO_TELEMETRY_ENV)  # no vLLM usage statistics, no Hugging Face telemetry, in anything Ray starts


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A private Ray instance for the drill (dashboard on a free port, for the state API); shut down after."""
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset progress lines between the figures
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def actors(class_prefix: str, alive_only: bool = True) -> list:
    """ActorStates (with pid and num_restarts) whose class name starts with `class_prefix`."""
    import ray
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive_only else None
    found = list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, detail=True, limit=10_000)
    return [a for a in found if a.class_name.startswith(class_prefix)]


def wait_for(predicate, timeout_s: float, every_s: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or the timeout passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None


def start_serve(args: dict, env: dict | None = None) -> str:
    """Run the serving graph (serve_app.build_app_with_env(args, env)) as app `main` on a free port; returns its URL."""
    from ray import serve

    from serve_app.app import build_app_with_env

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app_with_env(args, env=env or {}), name="main", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def server_processes() -> dict[str, tuple[int, str]]:
    """{actor id: (pid, class name)} of the live Serve processes: replicas, proxy and controller."""
    found = actors("ServeReplica:") + actors("ProxyActor") + actors("ServeController")
    return {a.actor_id: (a.pid, a.class_name) for a in found}


class RssSampler:
    """Samples the RSS of named processes every `every_s` in a background thread: peak of the sum, per process."""

    def __init__(self, processes: dict[int, str], every_s: float = 0.1):
        import psutil

        self.names = processes
        self.procs = {pid: psutil.Process(pid) for pid in processes}
        self.every_s = every_s
        self.baseline = self._sample()
        self.peak = dict(self.baseline)
        self.peak_total = self.end_total = sum(self.baseline.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, int]:
        rss = {}
        for pid, proc in self.procs.items():
            with contextlib.suppress(Exception):  # a process that died counts as 0
                rss[pid] = proc.memory_info().rss
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self._sample()
            self.peak = {pid: max(self.peak.get(pid, 0), rss) for pid, rss in sample.items()}
            self.peak_total = max(self.peak_total, sum(sample.values()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.end_total = sum(self._sample().values())

    @property
    def peak_growth_mb(self) -> float:
        """Peak of the summed RSS minus the summed baseline."""
        return (self.peak_total - sum(self.baseline.values())) / 2**20

    @property
    def retained_mb(self) -> float:
        """Summed RSS at the end minus the summed baseline."""
        return (self.end_total - sum(self.baseline.values())) / 2**20

    def largest(self) -> tuple[str, float]:
        """(name, MB) of the process whose own peak grew most over its baseline."""
        pid = max(self.peak, key=lambda p: self.peak[p] - self.baseline.get(p, 0))
        return self.names[pid], (self.peak[pid] - self.baseline.get(pid, 0)) / 2**20


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    """Two aligned columns under a title."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
