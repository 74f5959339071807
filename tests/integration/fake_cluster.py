"""A fake autoscaling multi-node Ray cluster on this machine, built from a cluster launcher config (cluster.yaml).

Ray's fake multi-node provider (`FakeMultiNodeProvider`) launches a "node" as a second raylet on this
machine, advertising exactly the resources of its node type, so the real autoscaler (v2, what `ray up` runs since
Ray 2.50) scales real node types up and down on demand. Ray 2.60's own wrapper, `ray.cluster_utils.
AutoscalingCluster`, cannot be used here: it reads `ray/autoscaler/_private/fake_multi_node/example.yaml`, which
the 2.60 wheel does not ship (FileNotFoundError; the autoscaler itself reads it too for `type: fake_multinode`, so
the provider is named as an external one), and it starts and stops with `ray stop --force`, which ends every Ray
on the machine. `FakeCluster` starts the same thing (`ray start --head --autoscaling-config=...` with
RAY_FAKE_CLUSTER=1 and the v2 switches AutoscalingCluster sets) on its own temp dir and free ports, everything on
127.0.0.1, and ends only the processes it started. Its provider (fake_provider/own_runtime_dirs.py) gives each fake
node a runtime-resources directory of its own, as separate machines have: jobs submitted with a working_dir then
run on the head and a fake worker at once.

The autoscaler's view is read from the GCS (`GetClusterStatus`, what `ray status` prints): nodes with their Ray node
type and idle time, pending launches, and the requests the autoscaler found infeasible.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

RAY = Path(sys.executable).with_name("ray")
FAKE_HEAD_TYPE = "ray.head.default"
"""The fake provider tags its head with this node type (ray/autoscaler/_private/fake_multi_node/node_provider.py)."""
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"
"""The head's node id the fake provider expects under autoscaler v2 (FAKE_HEAD_NODE_ID in the same file)."""
FAKE_PROVIDER = "own_runtime_dirs.OwnRuntimeDirsProvider"
"""Ray's fake multi-node provider (fake_provider/own_runtime_dirs.py: each fake node with its own runtime-resources
directory), named as an `external` provider: as `type: fake_multinode` the autoscaler first reads that provider's
defaults file (fake_multi_node/example.yaml), which the 2.60 wheel does not ship; an external provider's defaults
are built in (ray/autoscaler/_private/providers.py, `_get_default_config`)."""
FAKE_PROVIDER_DIR = Path(__file__).resolve().parent / "fake_provider"
"""Put on the head's PYTHONPATH, where the autoscaler imports FAKE_PROVIDER."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_worker_type(cluster: dict) -> str:
    """The name of the (single) worker node type of a launcher config that provides a GPU."""
    names = [name for name, t in cluster["available_node_types"].items()
             if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert len(names) == 1, f"expected exactly one GPU worker type, found {names}"
    return names[0]


def fake_autoscaling_config(cluster: dict, idle_timeout_minutes: float, gcs_address: str) -> dict:
    """The launcher config's node types, limits and scaling speed under the fake provider.

    The head becomes the fake provider's `ray.head.default` with the head type's resources; every worker type is
    copied as it is (resources, min/max workers, node_config, which the fake provider ignores). CPU counts stay
    cluster.yaml's (8 + 12 on a 2-core machine): they are logical scheduling numbers, and with worker prestart off
    (`FakeCluster._env`) no process is started per CPU. Only the idle timeout is replaced, so a test waits
    seconds, not minutes, for a release. The setup, file-mount and start-command sections are left empty: no
    node is set up, the fake provider starts a raylet in-process.
    """
    head_name = cluster["head_node_type"]
    types = {name: copy.deepcopy(t) for name, t in cluster["available_node_types"].items() if name != head_name}
    types[FAKE_HEAD_TYPE] = {"resources": dict(cluster["available_node_types"][head_name]["resources"]),
                             "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": cluster["cluster_name"],
        "max_workers": cluster["max_workers"],
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        # The settings ray.cluster_utils.AutoscalingCluster gives the fake provider (with autoscaler v2), and the
        # GCS to start fake nodes against (its default is the machine's address on port 6379).
        "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": gcs_address},
        "auth": {}, "docker": {},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class Node:
    """One node as the autoscaler reports it."""

    node_type: str
    """Ray node type name (a key of available_node_types, or ray.head.default)."""
    instance_id: str
    """The fake provider's instance id."""
    node_id: str
    """The Ray node id (hex) of its raylet: what Ray's state API reports as a task's or actor's node_id."""
    status: str
    """RUNNING (something holds resources on it) or IDLE."""
    idle_s: float
    """How long the node has been idle, as its raylet reports it."""


@dataclass
class Snapshot:
    """The autoscaler's state at one moment."""

    nodes: list[Node]
    """Nodes whose raylet has registered (busy or idle)."""
    pending: dict[str, int]
    """Node type -> instances the autoscaler has asked for whose raylet has not registered yet."""
    infeasible: list[tuple[str, dict[str, float]]]
    """(source, bundle) for every resource bundle the autoscaler found no node type can ever hold; source is
    `task/actor`, `placement group` (Ray Train reserves its workers with one) or `request_resources`."""
    demands: list[dict[str, float]]
    """Resource bundles waiting for room (feasible or not)."""
    autoscaler_rounds: int
    """The autoscaler's state version: 0 until the autoscaler has reported once."""

    def of_type(self, node_type: str) -> list[Node]:
        """The nodes of one type."""
        return [n for n in self.nodes if n.node_type == node_type]


@dataclass
class FakeCluster:
    """A running fake autoscaling cluster: its head, ports and temp dir."""

    config: dict
    """The autoscaling config the head runs with."""
    temp_dir: Path
    """Ray's temp dir for this cluster alone (sessions, logs, sockets)."""
    gcs_port: int
    """GCS port on 127.0.0.1."""
    dashboard_port: int
    """Dashboard / Job API port on 127.0.0.1."""
    head: subprocess.Popen | None = None
    """The `ray start --head --block` process (its own session)."""
    output: Path | None = None
    """Where `ray start` writes its output."""
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    """Every process of this cluster seen so far, by pid (a psutil.Process refuses to signal a reused pid)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """Environment variables added to the head's, so every node, job driver and worker has them (e.g. PATH with
    the venv's `python` first, as a cluster node's start command sets it)."""

    @property
    def gcs_address(self) -> str:
        """host:port of the GCS."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The Job API address."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the head (with the autoscaler, which launches workers on demand); wait for the Job API and the
        autoscaler's first report."""
        config_file = self.temp_dir / "autoscaling.json"
        config_file.write_text(json.dumps(self.config))
        head = self.config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
        extra = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        cmd = [str(RAY), "start", "--head", "--block", f"--autoscaling-config={config_file}",
               f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--num-cpus={head.get('CPU', 0)}",
               f"--num-gpus={head.get('GPU', 0)}", "--disable-usage-stats"]
        if extra:
            cmd.append(f"--resources={json.dumps(extra)}")
        self.output = self.temp_dir / "ray_start.log"
        with open(self.output, "w") as out:
            self.head = subprocess.Popen(cmd, env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.seen[self.head.pid] = psutil.Process(self.head.pid)
        self._wait_for_job_api(timeout_s)

    def _env(self) -> dict[str, str]:
        """The head's environment (inherited by the autoscaler, the fake nodes and every job)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"} | self.extra_env
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAKE_PROVIDER_DIR), env.get("PYTHONPATH")) if p)
        env.update({
            # Every `ray.init()` inside the cluster (jobs, and Ray Train's own helper actors) joins this cluster:
            # without an address Ray looks for running GCS processes and refuses when it finds another Ray.
            "RAY_ADDRESS": self.gcs_address,
            # The fake provider refuses to run without it; the autoscaler loop runs every second.
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # Autoscaler v2, as `ray up` starts it, with the head node id the fake provider knows.
            "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, "RAY_NODE_TYPE_NAME": FAKE_HEAD_TYPE,
            # Loopback node addresses for the head and the fake nodes; no usage report.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            # A raylet starts one idle Python worker per logical CPU for the first driver by default: 8 + 12
            # processes on a 2-core machine. Workers start on demand instead.
            "RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0",
        })
        return env

    def _wait_for_job_api(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.head.returncode}:\n{self.output.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as reply:
                    snap = self.snapshot()
                    if reply.status == 200 and snap.of_type(FAKE_HEAD_TYPE) and snap.autoscaler_rounds:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the Job API did not answer within {timeout_s:.0f} s:\n{self.output.read_text()}")

    def snapshot(self) -> Snapshot:
        """The autoscaler's state now, from the GCS (the data `ray status` prints)."""
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.schema import Stats
        from ray.autoscaler.v2.utils import ClusterStatusParser
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(self.gcs_address).get_cluster_status(timeout_s=10))
        self._remember_processes()
        status = ClusterStatusParser.from_get_cluster_status_reply(reply, stats=Stats())
        nodes = [Node(n.ray_node_type_name, n.instance_id, n.node_id or "", n.node_status or "",
                      (n.resource_usage.idle_time_ms if n.resource_usage else 0) / 1000)
                 for n in status.active_nodes + status.idle_nodes]
        pending: dict[str, int] = {}
        for launch in status.pending_launches:
            pending[launch.ray_node_type_name] = pending.get(launch.ray_node_type_name, 0) + launch.count
        for node in status.pending_nodes:
            pending[node.ray_node_type_name] = pending.get(node.ray_node_type_name, 0) + 1
        return Snapshot(nodes, pending, _infeasible_bundles(reply.autoscaling_state), _demand_bundles(status),
                         reply.autoscaling_state.autoscaler_state_version)

    def _remember_processes(self) -> None:
        for proc in self.processes():
            self.seen.setdefault(proc.pid, proc)

    def processes(self) -> list[psutil.Process]:
        """This cluster's live processes: the `ray start` process tree (GCS, dashboard, the autoscaler and the fake
        nodes it starts, their workers, the jobs' drivers), and anything naming this cluster's temp dir or GCS port
        (a process whose parent has already exited)."""
        found: dict[int, psutil.Process] = {}
        me = psutil.Process()
        skip = {me.pid, *(p.pid for p in me.parents())}
        root = self.seen.get(self.head.pid) if self.head is not None else None
        if root is not None and _alive(root):
            try:
                found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid not in skip and any(self._names_me(arg) for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                try:
                    found.update({c.pid: c for c in proc.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return [p for pid, p in found.items() if pid not in skip]

    def _names_me(self, arg: str) -> bool:
        return str(self.temp_dir) in arg or arg == f"--gcs_server_port={self.gcs_port}" or (
            arg.startswith(("--gcs-address=", "--gcs_address=", "--address=")) and arg.endswith(f":{self.gcs_port}"))

    def stop(self, timeout_s: float = 5.0) -> list[int]:
        """End every process of this cluster: SIGTERM, then SIGKILL after `timeout_s` (GCS, raylet and `ray start`
        itself take longer than that to act on SIGTERM, and a test cluster keeps nothing worth a clean shutdown).
        Returns the pids still alive after it."""
        procs = self.seen | {p.pid: p for p in self.processes()}
        for proc in procs.values():
            _signal(proc, signal.SIGTERM)
        if _wait_gone(list(procs.values()), timeout_s):
            for proc in procs.values():
                _signal(proc, signal.SIGKILL)
            _wait_gone(list(procs.values()), 5)
        if self.head is not None and self.head.poll() is None:
            self.head.wait(timeout=5)
        return [p.pid for p in self.processes() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's bookkeeping is left)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    return alive


def _signal(proc: psutil.Process, sig: int) -> None:
    """Signal the process if it is still the one seen (`is_running` compares its start time: a reused pid is not)."""
    try:
        if proc.is_running():
            proc.send_signal(sig)
    except psutil.Error:
        pass


def _infeasible_bundles(state: Any) -> list[tuple[str, dict[str, float]]]:
    """Every bundle the autoscaler's last round marked infeasible (AutoscalingState in autoscaler.proto; `ray
    status` in 2.60 lists these only among its pending demands)."""
    bundles = [("task/actor", dict(r.resources_bundle)) for r in state.infeasible_resource_requests]
    for gang in state.infeasible_gang_resource_requests:
        bundles += [("placement group", dict(r.resources_bundle)) for r in gang.requests]
    for constraint in state.infeasible_cluster_resource_constraints:
        bundles += [("request_resources", dict(r.request.resources_bundle)) for r in constraint.resource_requests]
    return bundles


def _demand_bundles(status: Any) -> list[dict[str, float]]:
    demands = status.resource_demands
    groups = demands.ray_task_actor_demand + demands.placement_group_demand + demands.cluster_constraint_demand
    return [dict(b.bundle) for group in groups for b in group.bundles_by_count]


def new_cluster(cluster: dict, idle_timeout_minutes: float, extra_env: dict[str, str] | None = None) -> FakeCluster:
    """A not-yet-started FakeCluster for a launcher config, on its own temp dir and free ports."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rfc", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs_port = free_port()
    config = fake_autoscaling_config(cluster, idle_timeout_minutes, f"127.0.0.1:{gcs_port}")
    return FakeCluster(config, temp_dir, gcs_port, free_port(), extra_env=dict(extra_env or {}))
