"""The local Ray head that `make demo` and `make jobs` run on: its token, its start and stop, its open ports.

    python scripts/local_head.py token                  # ~/.ray/auth_token exists and only its owner can read it
    python scripts/local_head.py start [--port 6379] [--dashboard-port 8265] [-- EXTRA `ray start` FLAGS]
    python scripts/local_head.py stop [--port 6379] [--serve-pid-file runs/demo/serve.pid] [--serve-port 8000]
    python scripts/local_head.py listeners [--port 6379] [--serve-pid-file F] [--check-loopback]

A single-machine head with token authentication on, every port on 127.0.0.1: `ray start` replaces
`--node-ip-address=127.0.0.1` with the machine's own address and binds GCS and raylet to all interfaces unless
Ray's single-node switch is on (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so the head starts with it (its processes
and the jobs they run inherit it). A multi-node cluster is `ray up cluster.yaml`, not this.

`stop` ends exactly this head (the processes that name its GCS port, and their children) and the demo's
`serve run`, never another Ray on the machine (plain `ray stop` would end them all). Expected failures print one
line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

RAY = Path(sys.executable).with_name("ray")
HEAD_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
"""Token auth on, loopback only, no usage report from Ray, vLLM or Hugging Face (trimodal.inference.vllm_engine's
NO_TELEMETRY_ENV, written out: importing it would load torch): for the head, and so for every job and replica it
runs, and for everything started from this shell."""
WORKER_NICENESS = {"RAY_worker_niceness": "0"}
"""Ray starts every worker process at nice 15, below its own daemons (GCS, raylet, dashboard, agents, the job
supervisor: some fifteen processes), which then preempt the training workers of a 2-core machine. This head runs
the demo's and `make jobs`' work, so its workers run at the priority of the shell that started the head (set
RAY_worker_niceness before `make demo` to choose another)."""
LOOPBACK = ("127.", "::1", "::ffff:127.")
ALL_INTERFACES_BY_RAY = "ray::ServeReplica:"
"""The one listener Ray cannot be told to keep on loopback: each Serve replica's inter-deployment gRPC server (Ray
2.60's serve/_private/replica.py binds it to "[::]:0"). With token auth on, Ray's auth interceptor guards it."""


class HeadError(RuntimeError):
    """An expected failure, reported in one line."""


def token_file() -> Path:
    """Where Ray reads its token (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_token() -> Path:
    """Create the token when missing (never printed) and make it readable by its owner only (0600)."""
    path = token_file()
    if not path.exists():
        made = subprocess.run([str(RAY), "get-auth-token", "--generate"], env=os.environ | HEAD_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        if made.returncode != 0 or not path.exists():
            raise HeadError(f"`ray get-auth-token --generate` could not create {path}: "
                            f"{(made.stderr.strip().splitlines() or ['no output'])[-1]}")
        print(f"[token] created {path} (Ray token authentication; the token is never printed)")
    _owner_only(path.parent, 0o700)
    _owner_only(path, 0o600)
    return path


def _owner_only(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & 0o077:
        path.chmod(mode)
        print(f"[token] {path} was readable by other users (mode {current:04o}); now {mode:04o}, owner only")


def port_busy(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_processes(port: int) -> list[psutil.Process]:
    """The processes of the head whose GCS listens on `port`, with their children (workers, agents, jobs)."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != me and any(_names_gcs(arg, port) for arg in proc.info["cmdline"] or []):
            found[proc.pid] = proc
            found.update({c.pid: c for c in _children(proc)})
    return list(found.values())


def _names_gcs(arg: str, port: int) -> bool:
    """An argument naming the GCS on `port` (GCS itself, raylet, dashboard, monitor, client server)."""
    if arg == f"--gcs_server_port={port}":
        return True
    return arg.startswith(("--gcs-address=", "--gcs_address=", "--address=")) and arg.endswith(f":{port}")


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def serve_process(pid_file: Path | None) -> psutil.Process | None:
    """The demo's `serve run` process, when its pid file names a live one."""
    if pid_file is None or not pid_file.is_file():
        return None
    try:
        proc = psutil.Process(int(pid_file.read_text().strip()))
        return proc if "serve" in " ".join(proc.cmdline()) else None
    except (ValueError, psutil.Error):
        return None


def own_defaults(port: int, extra: list[str]) -> list[str]:
    """Flags that keep this head apart from any other Ray on the machine, unless `extra` sets them.

    - its own temp dir: Ray's job supervisor gives each job the address of the cluster started LAST under the
      temp dir (`<temp dir>/ray_current_cluster`), so with a shared /tmp/ray a job of this head would be sent to
      another Ray started after it (a second head, or a test's local Ray);
    - free ports where Ray's defaults are fixed: the dashboard agent's (52365; a second head would have no job
      agent: "No available agent to submit job") and the Ray Client server's (10001);
    - a free port for the Prometheus metrics export, printed at start (Ray's own pick is not shown anywhere).
    """
    own = {"--temp-dir": str(Path(tempfile.gettempdir()) / f"ray-{port}"),
           "--dashboard-agent-listen-port": str(free_port()), "--ray-client-server-port": str(free_port()),
           "--metrics-export-port": str(free_port())}
    return [f"{flag}={value}" for flag, value in own.items() if not any(a.startswith(flag) for a in extra)]


def start(port: int, dashboard_port: int, extra: list[str]) -> None:
    """Start the head, or say that one is already running on `port` and use it."""
    ensure_token()
    if head_processes(port):
        if subprocess.run([str(RAY), "status", "--address", f"127.0.0.1:{port}"], env=os.environ | HEAD_ENV,
                          capture_output=True, timeout=60).returncode != 0:
            raise HeadError(f"a Ray head on 127.0.0.1:{port} does not accept this machine's token "
                            f"({token_file()}); stop it (`make demo-stop`) or choose another RAY_PORT")
        print(f"   using the Ray head already running on 127.0.0.1:{port}")
        return
    for taken in (p for p in (port, dashboard_port) if port_busy(p)):
        raise HeadError(f"port {taken} is taken by a program that is not a Ray head; free it or choose others "
                        "with RAY_PORT=... DASHBOARD_PORT=...")
    cmd = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--num-cpus={os.cpu_count()}",
           "--disable-usage-stats", *own_defaults(port, extra), *extra]
    # Every process of the head inherits RAY_ADDRESS: Ray internals that look a cluster up with "auto" (Ray Train's
    # placement-group cleaner, the job supervisor) then find this head, not the one last started under /tmp/ray.
    head_env = WORKER_NICENESS | os.environ | HEAD_ENV | {"RAY_ADDRESS": f"127.0.0.1:{port}"}
    started = subprocess.run(cmd, env=head_env, capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        tail = "\n".join((started.stdout + started.stderr).strip().splitlines()[-15:])
        raise HeadError(f"`ray start` failed:\n{tail}")
    temp, metrics = flag_value(cmd, "--temp-dir"), flag_value(cmd, "--metrics-export-port")
    print(f"   started a Ray head: GCS 127.0.0.1:{port}, dashboard and job API http://127.0.0.1:{dashboard_port} "
          f"(token auth on, every port on 127.0.0.1; logs in {temp}/session_latest/logs)")
    print(f"   Prometheus metrics (Ray's and trimodal's): http://127.0.0.1:{metrics}/metrics")


def flag_value(cmd: list[str], flag: str) -> str:
    """The value of `flag` in a command line (`--flag=value` or `--flag value`)."""
    at = cmd.index(next(a for a in cmd if a.startswith(flag)))
    return cmd[at].partition("=")[2] or cmd[at + 1]


def stop(port: int, serve_pid_file: Path | None, serve_port: int | None) -> None:
    """End the demo's `serve run` and the head on `port`; check that nothing of theirs still listens."""
    serve = serve_process(serve_pid_file)
    procs = ([serve, *_children(serve)] if serve else []) + head_processes(port)
    if not procs:
        where = f" and no demo server on :{serve_port}" if serve_port else ""
        raise HeadError(f"nothing to stop: no Ray head on 127.0.0.1:{port}{where} (start one with make demo)")
    for proc in procs:
        _signal(proc, psutil.Process.terminate)
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        _signal(proc, psutil.Process.kill)
    psutil.wait_procs(alive, timeout=10)
    left = head_processes(port)
    if left or (serve_port and port_busy(serve_port)):
        raise HeadError(f"still running after stop: {len(left)} head processes"
                        + (f", something on :{serve_port}" if serve_port and port_busy(serve_port) else ""))
    if serve_pid_file is not None and serve_pid_file.exists():
        serve_pid_file.unlink()
    print(f"stopped: {len(procs)} processes (Ray head 127.0.0.1:{port}{', Serve' if serve else ''})")


def _signal(proc: psutil.Process, send) -> None:
    try:
        send(proc)
    except psutil.Error:
        pass


def listeners(port: int, serve_pid_file: Path | None) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of the head and the demo's server."""
    serve = serve_process(serve_pid_file)
    pids = {p.pid for p in head_processes(port)} | ({serve.pid, *(c.pid for c in _children(serve))} if serve else set())
    rows = set()
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            rows.add((conn.laddr.ip, conn.laddr.port, _name(conn.pid)))
    return sorted(rows)


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["token", "start", "stop", "listeners"])
    parser.add_argument("--port", type=int, default=6379, help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job API port")
    parser.add_argument("--serve-pid-file", type=Path, default=None, help="pid of the demo's `serve run`")
    parser.add_argument("--serve-port", type=int, default=None, help="the demo's HTTP port (checked by stop)")
    parser.add_argument("--check-loopback", action="store_true", help="listeners: exit 1 on any other address")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:cut])
    args.extra = argv[cut + 1:]  # more `ray start` flags (ports, --temp-dir)
    try:
        if args.command == "token":
            ensure_token()
        elif args.command == "start":
            start(args.port, args.dashboard_port, args.extra)
        elif args.command == "stop":
            stop(args.port, args.serve_pid_file, args.serve_port)
        else:
            return _print_listeners(args.port, args.serve_pid_file, args.check_loopback)
    except HeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_listeners(port: int, serve_pid_file: Path | None, check: bool) -> int:
    rows = listeners(port, serve_pid_file)
    exposed = []
    for ip, number, name in rows:
        note = ""
        if not ip.startswith(LOOPBACK):
            known = name.startswith(ALL_INTERFACES_BY_RAY)
            note = "  (all interfaces: Serve's inter-deployment gRPC, token-guarded)" if known else "  NOT LOOPBACK"
            exposed += [] if known else [(ip, number, name)]
        print(f"{ip:<24} {number:>6}  {name}{note}")
    if check and (exposed or not rows):
        print(f"error: {len(exposed)} of {len(rows)} listening sockets are not on loopback" if rows
              else f"error: no listening sockets found for a head on port {port}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
