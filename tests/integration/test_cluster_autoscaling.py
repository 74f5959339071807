"""cluster.yaml's node types on Ray's fake autoscaling multi-node cluster, running the phi2 rehearsal's real jobs:
their GPU requests launch the A100 worker type from zero, every job succeeds with its GPU work on that worker (on
the CPU, since torch there sees no CUDA), and the worker is released after the idle timeout.

The fake cluster (tests/integration/fake_cluster.py) is built at test time from cluster.yaml's own
`available_node_types` and head resources; only `idle_timeout_minutes` is shortened. The work arrives through the
Job API as docs/cluster.md submits it (tests/integration/phi2_jobs.py: the rehearsal's command lines and runtime
environment), with the phi2 preset's own requests: preprocess's encoder actors ask `--gpus-per-encoder 1`,
pretrain and finetune keep phi2's ScalingConfig (use_gpu, accelerator_type A100-40G, 8 CPUs per worker), evaluate
runs as a task with `--gpus 1 --accelerator-type A100-40G`, and `serve deploy` of serve_app/serve_config.yaml
(pointed at the run) asks 0.6 GPU for the LanguageModel and 0.1 for Speech and Vision. Only the weights (the
rehearsal's offline ones) and, for serving, the device (`cpu`: the fake node's torch has no CUDA), the engine
(`builtin`) and the torch threads are overridden.

Every scaling assertion reads the autoscaler's own state from the GCS (what `ray status` prints); where each piece
of GPU work ran is read from Ray's state API (the node id of every actor and task that held a GPU). The control run
renames the worker's accelerator resource in a copy of the node types: a Ray Train job asking for phi2's stage-1
workers must then be reported infeasible and no worker launched.

Each test prints its scaling log and writes it under its tmp_path (scaling.log).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ray.job_submission import JobSubmissionClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
PROBE = "tests/integration/cluster_probe_job.py"
"""The control's Ray Train job, relative to the uploaded working dir."""


def _load_sibling(name: str):
    """A helper module next to this file (the suite imports tests with --import-mode=importlib, which puts no test
    directory on sys.path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


fc = _load_sibling("fake_cluster")
pj = _load_sibling("phi2_jobs")

IDLE_TIMEOUT_MINUTES = 0.25
"""The fake cluster's idle timeout: 15 s instead of cluster.yaml's minutes, so a release is seen within the test."""
IDLE_SLACK_S = 3.0
"""How much earlier than the idle timeout a release may be seen: the raylet reports idle time once a second and the
test polls every POLL_S."""
POLL_S = 0.5
"""Seconds between two reads of the autoscaler state and the job statuses."""
JOB_TIMEOUT_S = 240.0
"""Longest wait for one job, worker launch included (Ray Train's start dominates on 2 cores)."""
ACCELERATOR_TYPE = "A100-40G"
"""The phi2 preset's stage accelerator_type, which evaluate is given too."""
ACCELERATOR = f"accelerator_type:{ACCELERATOR_TYPE}"
"""The resource a request for that accelerator type asks for."""
GPU_REQUESTS = pj.GpuRequests(encoder_gpus=1, eval_gpus=1, eval_accelerator=ACCELERATOR_TYPE)
"""The jobs' own GPU flags as docs/cluster.md gives them; pretrain and finetune take theirs from phi2.yaml."""
SERVE_ARGS = {"device": "cpu", "serving.engine": "builtin", "threads": 1}
"""The Serve app's args changed for this machine, each named: the fake GPU node's torch has no CUDA; the builtin
engine, which starts in seconds (vLLM's start on 2 CPU cores would not fit this test's few minutes, and
test_phi2_rehearsal.py already serves the run with vllm through `serve deploy`); one torch thread per replica."""
SERVE_GPUS = {"LanguageModel": 0.6, "Speech": 0.1, "Vision": 0.1}
"""What serve_config.yaml asks per replica, kept as it is."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
"""Job statuses that do not change any more."""
SMALL_MACHINE_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
"""Ray settings for a whole cluster on 2 cores, not for any job: Ray Data 2.60's Parquet reader starts 32
footer-reading actors per `read_parquet` by default (ray/data/_internal/datasource_v2/formats/parquet/
footer_file_indexer.py), spread over the nodes: on this machine that is about a minute of process starts per
training job, for tables of one file each."""
PLACEMENT_GROUP_RESOURCE = re.compile(r"(?P<name>.+)_group_(?P<bundle>\d+)_[0-9a-f]+")
"""How Ray names a resource reserved in a placement group's bundle (`GPU_group_0_<pg id>`); the Ray Train worker
holds its resources that way. The bundle-less `GPU_group_<pg id>` form names the same reservation again."""


@dataclass
class ScalingLog:
    """Timestamped events, seconds since the log started; printed as they happen."""

    t0: float = field(default_factory=time.monotonic)
    """time.monotonic() at the start."""
    lines: list[str] = field(default_factory=list)
    """One line per event."""

    def event(self, text: str) -> float:
        """Record and print one event; returns its time."""
        t = time.monotonic() - self.t0
        self.lines.append(f"t={t:6.1f}s  {text}")
        print(f"[scaling] {self.lines[-1]}", flush=True)
        return t

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


@dataclass
class Watcher:
    """Turns successive autoscaler snapshots into scaling events for one node type."""

    cluster: fc.FakeCluster
    node_type: str
    """The Ray node type watched (cluster.yaml's GPU worker type)."""
    log: ScalingLog
    seen: dict[str, fc.Node] = field(default_factory=dict)
    """Instance id -> the node as last seen, for instances still up."""
    node_ids: dict[str, str] = field(default_factory=dict)
    """Ray node id -> instance id, for every instance of the type ever seen."""
    launched: list[float] = field(default_factory=list)
    """Event times of instances first seen."""
    released: list[tuple[float, float]] = field(default_factory=list)
    """(event time, the most idle seconds it can have had) of instances gone: the idle time last reported plus the
    time from that snapshot to the one without it (on a busy machine snapshots come seconds apart)."""
    seen_at: float = 0.0
    """time.monotonic() of the snapshot that `seen` comes from."""
    most_at_once: int = 0
    """The largest number of instances of the type seen at one time."""
    requested: bool = False
    """An instance of the type is being launched now."""
    last: fc.Snapshot | None = None
    """The latest snapshot."""

    def poll(self) -> fc.Snapshot:
        snap = self.last = self.cluster.snapshot()
        taken = time.monotonic()
        pending = snap.pending.get(self.node_type, 0)
        if pending and not self.requested:
            self.log.event(f"autoscaler launches {pending} x {self.node_type}")
        self.requested = bool(pending)
        now = {n.instance_id: n for n in snap.of_type(self.node_type)}
        for iid, node in now.items():
            before = self.seen.get(iid)
            self.node_ids[node.node_id] = iid
            if before is None:
                self.launched.append(self.log.event(f"worker {self.node_type} #{iid[-5:]} launched ({node.status})"))
            elif before.status != node.status:
                self.log.event(f"worker {self.node_type} #{iid[-5:]} {before.status} -> {node.status}")
        for iid in self.seen.keys() - now.keys():
            idle, gap = self.seen[iid].idle_s, taken - self.seen_at
            self.released.append((self.log.event(f"worker {self.node_type} #{iid[-5:]} released (idle {idle:.1f} s "
                                                 f"when last seen, {gap:.1f} s before)"), idle + gap))
        self.seen, self.seen_at = now, taken
        self.most_at_once = max(self.most_at_once, len(now))
        return snap

    def wait(self, done: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Poll the autoscaler until `done()` returns something true; returns it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            result = done()
            if result:
                return result
            time.sleep(POLL_S)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; autoscaler: {self.last}")

    def where(self, node_id: str) -> str:
        """`<type> #<instance>` for a node of the watched type, else `another node (<id>)`."""
        iid = self.node_ids.get(node_id)
        return f"{self.node_type} #{iid[-5:]}" if iid else f"another node ({node_id[:8]})"


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@contextmanager
def fake_cluster(cluster: dict, log: ScalingLog, keep_logs: Path) -> Iterator[fc.FakeCluster]:
    """A running fake cluster for the launcher config; its processes are all gone afterwards (asserted), and
    Ray's logs are copied to `keep_logs` when the body fails.

    Every node runs this checkout's venv (`python` first on PATH, as cluster.yaml's setup puts .venv/bin there) with
    the repository root on PYTHONPATH (where a Serve config file's `serve_app:build_app` is imported, as
    cluster.yaml's head start command sets it). Storage needs no NFS: the fake nodes share this machine's disk,
    so the paths the jobs are given are the same on every node (on the real cluster they are under /srv/trimodal,
    which the GPU worker mounts from the head over NFS).
    """
    env = {"PATH": f"{pj.BIN}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT), **SMALL_MACHINE_ENV}
    fake = fc.new_cluster(cluster, IDLE_TIMEOUT_MINUTES, env)
    failed = True
    try:
        fake.start()
        log.event(f"head up: {fake.config['available_node_types']['ray.head.default']['resources']}, "
                  f"Job API {fake.dashboard_url}")
        yield fake
        failed = False
    finally:
        left = fake.stop()
        if failed:
            shutil.copytree(fake.temp_dir, keep_logs, symlinks=True, ignore=shutil.ignore_patterns("sockets"))
        shutil.rmtree(fake.temp_dir, ignore_errors=True)
    assert not left, f"processes of the fake cluster survived its stop: {left}"


# ---------------------------------------------------------------------------------------------------------------
# Jobs through the Job API, and where their GPU work ran (Ray's state API)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """One actor or task that held a GPU, and the node it ran on."""

    what: str
    """Actor class name or task name."""
    resources: dict[str, float]
    """The resources it asked for."""
    node_id: str
    """The Ray node id it ran on."""
    pid: int
    """Its worker process id."""


@dataclass
class JobRun:
    """One finished job."""

    name: str
    """The rehearsal job's name."""
    status: str
    """Its final Job API status."""
    job_id: str
    """The Ray job id of its driver (what the state API files its actors and tasks under)."""
    logs: str
    """The driver's output, with the lines its actors and tasks printed."""
    submitted_at: float
    """Scaling-log time of its submission."""


def submit(client: JobSubmissionClient, name: str, argv: tuple[str, ...]) -> str:
    """`ray job submit --working-dir . -- python ARGV...`, as docs/cluster.md does it, through the Job API."""
    return client.submit_job(entrypoint=shlex.join(["python", *argv]), runtime_env=pj.runtime_env(),
                             submission_id=f"phi2-{name}-{uuid.uuid4().hex[:8]}")


def status_of(client: JobSubmissionClient, job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def run_job(client: JobSubmissionClient, watcher: Watcher, job: pj.Job) -> JobRun:
    """Submit one rehearsal job, wait for it while watching the autoscaler, assert SUCCEEDED."""
    sid = submit(client, job.name, job.argv)
    submitted_at = watcher.log.event(f"job {job.name} submitted")
    status = watcher.wait(lambda: (s := status_of(client, sid)) in TERMINAL and s, JOB_TIMEOUT_S, f"job {job.name}")
    run = JobRun(job.name, status, client.get_job_info(sid).job_id or "", client.get_job_logs(sid), submitted_at)
    assert status == "SUCCEEDED", f"job {job.name} ended {status}:\n{run.logs[-6000:]}"
    return run


def gpu_placements(address: str, job_id: str | None = None) -> list[Placement]:
    """Every actor and task (of one Ray job, or all) that asked for a GPU, with the node it ran on."""
    from ray.util.state import list_actors, list_tasks

    by_job = [("job_id", "=", job_id)] if job_id else []
    actors = list_actors(address=address, filters=by_job, detail=True, limit=10_000, raise_on_missing_output=False)
    tasks = list_tasks(address=address, filters=[*by_job, ("type", "=", "NORMAL_TASK")], detail=True,
                       limit=10_000, raise_on_missing_output=False)
    found = [Placement(a.class_name, plain_resources(a.required_resources), a.node_id or "", a.pid or 0)
             for a in actors]
    found += [Placement(t.name, plain_resources(t.required_resources), t.node_id or "", t.worker_pid or 0)
              for t in tasks]
    return [p for p in found if p.resources.get("GPU", 0) > 0]


def plain_resources(required: dict | None) -> dict[str, float]:
    """Resources as asked for: a placement-group bundle's `X_group_<i>_<pg>` read as X; other group names
    (the bundle-less duplicates and the bundle marker) dropped."""
    plain: dict[str, float] = {}
    for name, amount in (required or {}).items():
        if match := PLACEMENT_GROUP_RESOURCE.fullmatch(name):
            if match["name"] != "bundle":
                plain[match["name"]] = plain.get(match["name"], 0) + amount
        elif "_group_" not in name:
            plain[name] = amount
    return plain


def describe(placements: list[Placement], watcher: Watcher) -> str:
    return "; ".join(f"{p.what} {json.dumps(p.resources, sort_keys=True)} on {watcher.where(p.node_id)}"
                     for p in placements)


def assert_on_gpu_worker(placements: list[Placement], watcher: Watcher, what: str) -> None:
    """Some GPU work was done, and all of it on the GPU worker type."""
    assert placements, f"{what}: no actor or task asked for a GPU"
    elsewhere = [p for p in placements if p.node_id not in watcher.node_ids]
    assert not elsewhere, f"{what}: GPU work ran off the {watcher.node_type} worker: {elsewhere}"


def run_on_gpu_worker(client: JobSubmissionClient, watcher: Watcher, address: str,
                      job: pj.Job) -> tuple[JobRun, list[Placement]]:
    """Run one job whose GPU work must land on the GPU worker; log and return where it ran."""
    run = run_job(client, watcher, job)
    placements = gpu_placements(address, run.job_id)
    watcher.log.event(f"job {job.name} {run.status}: {describe(placements, watcher)}")
    assert_on_gpu_worker(placements, watcher, f"job {job.name}")
    return run, placements


def assert_trained_where_torch_sees(stage_dir: Path, placements: list[Placement]) -> str:
    """A stage trained in its job's one GPU actor (the Ray Train worker) on CUDA exactly when torch there sees CUDA:
    the worker that wrote workers.jsonl is that actor, and its checkpoints hold a CUDA RNG state exactly then
    (trimodal.training.checkpoint saves one whenever torch.cuda.is_available()). The fake node runs this venv,
    so its torch sees CUDA exactly when this process's does. Returns the device it trained on."""
    from safetensors import safe_open

    (worker,) = placements
    rows = [json.loads(line) for line in (stage_dir / "workers.jsonl").read_text().splitlines() if line.strip()]
    assert [r["pid"] for r in rows] == [worker.pid], (rows, worker)
    checkpoints = sorted((stage_dir / "train").glob("checkpoint_*/rng.safetensors"))
    assert checkpoints, f"no checkpoint under {stage_dir / 'train'}"
    for rng in checkpoints:
        with safe_open(str(rng), "pt") as saved:
            assert ("cuda0" in set(saved.keys())) == torch.cuda.is_available(), (rng, list(saved.keys()))
    losses = [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses), losses
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Serving: `serve deploy` of serve_config.yaml pointed at the run
# ---------------------------------------------------------------------------------------------------------------


def serve_config(path: Path, runs: Path, weights: list[str], port: int) -> Path:
    """serve_app/serve_config.yaml pointed at the run (pj.serve_config_for_run) with SERVE_ARGS; its deployments'
    replica counts, CPUs and GPU shares unchanged. The LanguageModel's vllm interpreter is dropped with the vllm
    engine: the builtin engine runs in the replica's own environment."""
    config = pj.serve_config_for_run(runs / "finetune" / "final", runs, port,
                                     {**SERVE_ARGS, **dict(o.split("=", 1) for o in weights)})
    for deployment in config["applications"][0]["deployments"]:
        deployment["ray_actor_options"].pop("runtime_env", None)
        assert deployment["ray_actor_options"].get("num_gpus") == SERVE_GPUS.get(deployment["name"]), deployment
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def http(url: str, body: dict | None = None, timeout_s: float = 120) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a JSON POST when `body` is given; (0, b"") when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def serve_cli(*args: str) -> str:
    done = subprocess.run([str(pj.BIN / "serve"), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"serve {args[0]} exited {done.returncode}:\n{out[-4000:]}"
    return out


def serve_the_run(fake: fc.FakeCluster, watcher: Watcher, runs: Path, weights: list[str]) -> list[Placement]:
    """`serve deploy` the run; one chat request must answer 200; `serve shutdown -y` must close the port (it exits
    0 even when it failed). Returns where the replicas that held a GPU ran."""
    port = fc.free_port()
    config = serve_config(runs / "serve_config.yaml", runs, weights, port)
    serve_cli("deploy", str(config), "--address", fake.dashboard_url)
    watcher.log.event("serve deploy submitted (LanguageModel 0.6 GPU, Speech 0.1, Vision 0.1)")
    watcher.wait(lambda: http(f"http://127.0.0.1:{port}/readyz", timeout_s=5)[0] == 200, JOB_TIMEOUT_S,
                 "the Serve app to be ready")
    status, body = http(f"http://127.0.0.1:{port}/v1/chat/completions",
                        {"model": "trimodal-phi2", "messages": [{"role": "user", "content": "Name a colour."}],
                         "max_tokens": 4, "temperature": 0})
    assert status == 200, body[-2000:]
    answer = json.loads(body)["choices"][0]["message"]["content"]
    replicas = [p for p in gpu_placements(fake.dashboard_url) if p.what.startswith("ServeReplica:trimodal:")]
    watcher.log.event(f"chat answered 200 ({answer!r}): {describe(replicas, watcher)}")
    serve_cli("shutdown", "-y", "--address", fake.dashboard_url)
    watcher.wait(lambda: port_closed(port), 60, f"Serve to close port {port} after `serve shutdown -y`")
    watcher.log.event("serve shutdown: port closed")
    return replicas


def assert_serve_shares(replicas: list[Placement], watcher: Watcher) -> None:
    """Each GPU deployment had a replica with serve_config.yaml's GPU share, on the GPU worker."""
    assert_on_gpu_worker(replicas, watcher, "Serve")
    shares = {p.what.rsplit(":", 1)[1]: p.resources["GPU"] for p in replicas}
    assert shares == SERVE_GPUS, shares


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Rehearsed:
    """What the rehearsal's work did on the fake cluster."""

    placed: dict[str, list[Placement]] = field(default_factory=dict)
    """Job name (and `serve`) -> the actors and tasks of it that held a GPU, with their nodes."""
    first_gpu_request: float = 0.0
    """Scaling-log time at which the first job asking for a GPU was submitted."""


def run_the_rehearsal(fake: fc.FakeCluster, watcher: Watcher, runs: Path, weights: list[str]) -> Rehearsed:
    """make_shapes (no GPU: the worker stays at zero), the four GPU jobs, then the Serve app."""
    client = JobSubmissionClient(fake.dashboard_url)
    jobs = pj.phi2_jobs(runs, weights, GPU_REQUESTS)
    shapes = run_job(client, watcher, jobs[0])
    watcher.log.event(f"job {shapes.name} {shapes.status} on the head; no GPU asked")
    assert not watcher.launched and not watcher.requested, "a GPU worker was launched before any GPU request"
    done = Rehearsed()
    for job in jobs[1:]:
        run, done.placed[job.name] = run_on_gpu_worker(client, watcher, fake.dashboard_url, job)
        done.first_gpu_request = done.first_gpu_request or run.submitted_at
        if job.name in ("pretrain", "finetune"):
            device = assert_trained_where_torch_sees(runs / job.name, done.placed[job.name])
            watcher.log.event(f"{job.name}: its Ray Train worker trained on {device} (workers.jsonl, checkpoints)")
        if job.name == "evaluate":
            watcher.log.event(f"evaluate: {evaluation_device(run.logs)}")
    done.placed["serve"] = serve_the_run(fake, watcher, runs, weights)
    return done


def evaluation_device(logs: str) -> str:
    """The evaluation task's own `[evaluate] on <device>` line (CUDA exactly where torch sees it)."""
    lines = re.findall(r"\[evaluate\] on (\S+)", logs)
    assert lines, f"no `[evaluate] on <device>` line:\n{logs[-3000:]}"
    assert lines[-1].startswith("cuda") == torch.cuda.is_available(), lines
    return f"[evaluate] on {lines[-1]}"


def assert_requests(placed: dict[str, list[Placement]]) -> None:
    """Each job asked for what the phi2 preset and the job flags say: a GPU per encoder actor, one Ray Train worker
    with a GPU, 8 CPUs and the A100-40G type per stage, a GPU of that type for the evaluation."""
    assert all(p.resources["GPU"] == 1 for p in placed["preprocess"]), placed["preprocess"]
    for stage in ("pretrain", "finetune"):
        (worker,) = placed[stage]
        assert worker.resources["GPU"] == 1 and worker.resources["CPU"] == 8, worker
        assert worker.resources.get(ACCELERATOR, 0) > 0, worker
    (evaluation,) = placed["evaluate"]
    assert evaluation.resources["GPU"] == 1 and evaluation.resources.get(ACCELERATOR, 0) > 0, evaluation


@pytest.mark.slow
def test_the_phi2_rehearsal_jobs_launch_the_a100_worker_from_zero_and_release_it(cluster_yaml, tmp_path):
    gpu_type = fc.gpu_worker_type(cluster_yaml)
    runs = tmp_path / "runs"
    log = ScalingLog()
    weights = pj.build_weights(runs / "weights", dict(os.environ))  # outside the cluster, as a user builds them
    log.event(f"rehearsal weights built under {runs / 'weights'}")
    with fake_cluster(cluster_yaml, log, tmp_path / "ray-logs") as fake:
        watcher = Watcher(fake, gpu_type, log)
        snap = watcher.poll()
        assert not snap.of_type(gpu_type) and not snap.pending.get(gpu_type), "the GPU worker type starts at zero"
        done = run_the_rehearsal(fake, watcher, runs, weights)
        assert watcher.launched and watcher.launched[0] > done.first_gpu_request
        assert_requests(done.placed)
        assert_serve_shares(done.placed["serve"], watcher)
        evaluated = json.loads((runs / "finetune" / "eval.json").read_text())
        assert evaluated["questions"] and evaluated["captions"], evaluated

        idle_s = IDLE_TIMEOUT_MINUTES * 60
        watcher.wait(lambda: not watcher.seen, idle_s + 60, "the GPU worker to be released")
        early = [round(idle, 1) for _, idle in watcher.released if idle < idle_s - IDLE_SLACK_S]
        assert not early, f"released after only {early} s idle (idle timeout {idle_s:.0f} s)"
        assert watcher.most_at_once <= cluster_yaml["available_node_types"][gpu_type]["max_workers"]
        assert watcher.poll().of_type(fc.FAKE_HEAD_TYPE), "the head stays"
    log.event(f"cluster stopped, no process left; {gpu_type} launched {len(watcher.launched)}x, "
              f"at most {watcher.most_at_once} at once")
    log.write(tmp_path / "scaling.log")


def renamed_resource(cluster: dict, old: str, new: str) -> dict:
    """A copy of the launcher config whose node types offer `new` where cluster.yaml offers `old`."""
    renamed = copy.deepcopy(cluster)
    for node_type in renamed["available_node_types"].values():
        resources = node_type["resources"]
        if old in resources:
            resources[new] = resources.pop(old)
    return renamed


@pytest.mark.slow
def test_a_renamed_accelerator_leaves_the_phi2_training_request_infeasible(cluster_yaml, tmp_path):
    renamed = renamed_resource(cluster_yaml, ACCELERATOR, "accelerator_type:A100-80G")
    gpu_type = fc.gpu_worker_type(renamed)
    assert ACCELERATOR not in renamed["available_node_types"][gpu_type]["resources"]
    log = ScalingLog()
    with fake_cluster(renamed, log, tmp_path / "ray-logs") as fake:
        watcher = Watcher(fake, gpu_type, log)
        client = JobSubmissionClient(fake.dashboard_url)
        job_id = submit(client, "probe", (PROBE, f"--storage={tmp_path / 'ray_results'}"))
        log.event(f"job probe submitted (phi2's stage-1 ScalingConfig: asks {ACCELERATOR})")

        def reported() -> list[tuple[str, dict]]:
            assert status_of(client, job_id) not in TERMINAL, client.get_job_logs(job_id)[-3000:]
            return [(source, b) for source, b in watcher.last.infeasible if ACCELERATOR in b]

        found = watcher.wait(reported, JOB_TIMEOUT_S, f"the autoscaler to report {ACCELERATOR} infeasible")
        source, bundle = found[0]
        log.event(f"autoscaler reports infeasible ({source}): {bundle}")
        assert bundle.get("GPU") == 1 and bundle.get("CPU") == 8, bundle
        assert not watcher.launched and not watcher.requested, "no worker type can hold the request"

        client.stop_job(job_id)
        status = watcher.wait(lambda: (s := status_of(client, job_id)) in TERMINAL and s, 60, "the job to stop")
        log.event(f"job probe {status}")
        assert status == "STOPPED"
        assert not watcher.launched
    log.event("cluster stopped, no process left")
    log.write(tmp_path / "scaling.log")
