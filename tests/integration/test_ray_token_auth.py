"""A token-authenticated Ray head refuses job submissions without the token (secure defaults: docs/cluster.md).

Starts its own head exactly as `make demo` and `make jobs` do (`scripts/local_head.py start`: it creates the token
when missing, owner-only, and starts `ray start --head` with token auth on and every port on 127.0.0.1), with a fresh
HOME (so the script makes a private ~/.ray/auth_token) and free GCS and dashboard ports; everything else is the
script's default (its own temp dir /tmp/ray-PORT, free agent and client ports), so it never touches another Ray on the
machine. It is stopped the way `make demo-stop` stops it, then any survivor is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
LOCAL_HEAD = Path(__file__).resolve().parents[2] / "scripts" / "local_head.py"


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free right now on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment without any Ray address or token settings, with HOME (so ~/.ray/auth_token) replaced."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def _belongs_to(cmdline: list[str], temp_dir: Path, gcs_port: int) -> bool:
    """A process of our head: it names our temp dir, or our GCS (`--address=HOST:PORT`, e.g. the Ray client
    server, which `ray start` spawns without the temp dir)."""
    return any(str(temp_dir) in arg or (arg.startswith(("--address=", "--gcs-address="))
                                        and arg.endswith(f":{gcs_port}")) for arg in cmdline)


def stop_processes_of(temp_dir: Path, gcs_port: int, timeout: float = 15.0) -> int:
    """Terminate (then kill) every process of the head started with `temp_dir` and `gcs_port`, and descendants."""
    import psutil

    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid not in skip and _belongs_to(p.info["cmdline"] or [], temp_dir, gcs_port)]
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True) if c.pid not in skip})
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


@dataclass
class Head:
    """A running token-authenticated head."""

    gcs_port: int
    dashboard_port: int
    home: Path
    """HOME holding the head's ~/.ray/auth_token."""
    token: str
    """The token."""
    outsider_home: Path
    """An empty HOME: no token anywhere."""
    submissions: list[str] = field(default_factory=list)
    """The submission ids `submit` has used on this head, refused or not (other tests' jobs are not among them)."""

    @property
    def dashboard(self) -> str:
        """Job API / dashboard URL on 127.0.0.1."""
        return f"http://127.0.0.1:{self.dashboard_port}"


@pytest.fixture(scope="module")
def token_head():
    root = Path(tempfile.mkdtemp(prefix="rtok", dir="/tmp"))
    home, outsider = root / "home", root / "outsider"
    home.mkdir()
    outsider.mkdir()
    env = clean_env(home, RAY_AUTH_MODE="token")
    gcs = 0
    try:
        gcs, dashboard, started = start_default_head(home)
        token_file = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, "the token must be readable by its owner only"
        token = token_file.read_text().strip()
        assert token not in started.stdout + started.stderr, "the token must never be printed"
        yield Head(gcs, dashboard, home, token, outsider)
        stopped = subprocess.run([sys.executable, str(LOCAL_HEAD), "stop", f"--port={gcs}"], env=env, cwd=root,
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    finally:
        survivors = stop_default_head(gcs) if gcs else 0
        shutil.rmtree(root, ignore_errors=True)
    assert survivors == 0, "processes of the test head survived `local_head.py stop`"


def start_default_head(home: Path) -> tuple[int, int, subprocess.CompletedProcess]:
    """A head started by `local_head.py start` with only its two ports given (every other setting its default)."""
    gcs, dashboard = free_ports(2)
    started = subprocess.run([sys.executable, str(LOCAL_HEAD), "start", f"--port={gcs}", f"--dashboard-port={dashboard}"],
                             env=clean_env(home, RAY_AUTH_MODE="token"), cwd=home, capture_output=True, text=True,
                             timeout=300)
    if started.returncode != 0:
        stop_default_head(gcs)
        pytest.fail(f"local_head.py start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    return gcs, dashboard, started


def stop_default_head(gcs: int) -> int:
    """Kill whatever is left of a default head on `gcs` and remove its temp dir; returns how many processes were."""
    temp = Path(tempfile.gettempdir()) / f"ray-{gcs}"
    left = stop_processes_of(temp, gcs_port=gcs, timeout=5)
    shutil.rmtree(temp, ignore_errors=True)
    return left


def submit(head: Head, home: Path, **env: str) -> tuple[str, subprocess.CompletedProcess]:
    """(its submission id, the outcome) of `ray job submit -- echo hi` under a submission id of its own."""
    submission = f"auth-test-{uuid.uuid4().hex[:12]}"
    head.submissions.append(submission)
    return submission, subprocess.run([str(RAY), "job", "submit", "--address", head.dashboard, "--submission-id",
                                       submission, "--", "echo", "hi"], env=clean_env(home, **env), cwd=home,
                                      capture_output=True, text=True, timeout=180)


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_job_api_refuses_requests_without_the_token(token_head):
    assert http_status(f"{token_head.dashboard}/api/jobs/") == 401
    assert http_status(f"{token_head.dashboard}/api/jobs/", token="0" * 64) in (401, 403)
    assert http_status(f"{token_head.dashboard}/api/jobs/", token=token_head.token) == 200


@pytest.mark.parametrize("client", ["auth-disabled", "auth-on-no-token", "wrong-token"])
def test_submission_without_the_token_is_refused(token_head, client):
    env = {"auth-disabled": {"RAY_AUTH_MODE": "disabled"},
           "auth-on-no-token": {"RAY_AUTH_MODE": "token"},
           "wrong-token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}}[client]
    _, result = submit(token_head, token_head.outsider_home, **env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "AuthenticationError" in output or "Unauthorized" in output, output[-2000:]


def test_submission_with_the_token_runs_and_nothing_else_did(token_head):
    """Of the submissions this module made (other tests submit jobs to this head too), only the authenticated one
    became a job."""
    submission, result = submit(token_head, token_head.home, RAY_AUTH_MODE="token")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    listed = subprocess.run([str(RAY), "job", "list", "--address", token_head.dashboard],
                            env=clean_env(token_head.home, RAY_AUTH_MODE="token"), cwd=token_head.home,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    request = urllib.request.Request(f"{token_head.dashboard}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token_head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        jobs = json.loads(response.read())
    ours = [job for job in jobs if job["submission_id"] in token_head.submissions]
    assert [job["submission_id"] for job in ours] == [submission], f"only the authenticated one may exist: {ours}"
    assert ours[0]["entrypoint"] == "echo hi" and ours[0]["status"] == "SUCCEEDED"



WHICH_CLUSTER = """
import os, ray
ray.init()
worker, niceness = ray.get(ray.remote(lambda: (os.environ.get("RAY_ADDRESS"), os.nice(0))).remote())
print("addresses=" + os.environ["RAY_ADDRESS"] + "," + str(worker))
print(f"niceness={os.nice(0)},{niceness}")
"""
"""A job that prints the cluster address its driver is given and the one a worker process of the cluster sees
(what Ray internals such as Ray Train's placement-group cleaner resolve "auto" with), then both processes'
niceness."""


def which_cluster_line(dashboard: int, home: Path, key: str) -> list[str]:
    """The comma-separated values of WHICH_CLUSTER's `key=` line, from a job submitted to the head on `dashboard`."""
    result = subprocess.run([str(RAY), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                             sys.executable, "-c", WHICH_CLUSTER], env=clean_env(home, RAY_AUTH_MODE="token"),
                            cwd=home, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"{key}="))
    return line.split("=", 1)[1].split(",")


def job_niceness(dashboard: int, home: Path) -> list[int]:
    """[the driver's niceness, a worker's niceness] in a job submitted to the head on `dashboard`."""
    return [int(v) for v in which_cluster_line(dashboard, home, "niceness")]


def test_the_demo_heads_workers_run_at_normal_priority(token_head):
    """Ray starts workers at nice 15 unless told otherwise; the demo's head runs its jobs' workers (Ray Train's,
    Ray Data's) at the priority of the shell that started it, so the demo is not slowed by Ray's own processes."""
    assert job_niceness(token_head.dashboard_port, token_head.home) == [os.nice(0), os.nice(0)]


def job_sees_address(dashboard: int, home: Path) -> list[str]:
    """[driver's RAY_ADDRESS, a worker's RAY_ADDRESS] of a job submitted to the head on `dashboard`."""
    return which_cluster_line(dashboard, home, "addresses")


def test_two_default_heads_side_by_side_each_run_their_own_jobs(token_head):
    """A second head started with local_head.py's defaults beside the fixture's: both accept jobs, and each job's
    driver and worker processes are told their own cluster. With Ray's defaults the second head had no job agent (the fixed agent port), and a job of
    the first was given the second's address (Ray's job supervisor picks the cluster started last under a shared
    temp dir)."""
    second = 0
    try:
        second, second_dashboard, _ = start_default_head(token_head.home)
        assert job_sees_address(token_head.dashboard_port, token_head.home) == [f"127.0.0.1:{token_head.gcs_port}"] * 2
        assert job_sees_address(second_dashboard, token_head.home) == [f"127.0.0.1:{second}"] * 2
    finally:
        if second:
            stop_default_head(second)
