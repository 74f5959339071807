"""First-contact mistakes with the job CLIs: each ends with one clear line on stderr, a non-zero exit code, no
traceback, and before any Ray starts (a guard timeout stands in for "fails within seconds, not minutes").

Every case runs the real entry point in a subprocess, exactly as a user types it (or as `ray job submit` runs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every case runs a job's entry point in a subprocess; three start a local Ray
ROOT = Path(__file__).resolve().parents[2]
GUARD_S = 90
"""A mistake is reported in seconds; this only stops a hang from stalling the suite."""


def run_job(argv: list[str], cwd: Path, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.run([python, *argv], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=GUARD_S)


def assert_one_clear_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def refused_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from trimodal.data.shapes.dataset import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, n_train=4, n_val=2, seed=3)
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A missing dir, an empty (half-written) one, a run with checkpoints but no final/, a data dir whose manifest
    is there (enough for the path checks) and a file that is JSON but not LLaVA-Instruct."""
    base = tmp_path_factory.mktemp("mistakes")
    half_run = base / "half_run"
    (half_run / "checkpoints").mkdir(parents=True)
    data = base / "data"
    for table in ("images", "captions", "conversations"):
        (data / table).mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": ["train"]}))
    (base / "half").mkdir()
    (base / "run" / "final").mkdir(parents=True)
    (base / "run" / "final" / "run.json").write_text("{}")
    (base / "not_llava.json").write_text(json.dumps({"images": [], "annotations": []}))
    return {"missing": base / "missing", "half": base / "half", "half_run": half_run, "data": data,
            "not_llava": base / "not_llava.json", "run": base / "run", "out": base / "out"}


CASES = {
    "pretrain --data missing": (["jobs/pretrain.py", "--preset", "test", "--data", "{missing}", "--out", "{out}"],
                                ["--data", "no such directory"]),
    "pretrain --data half-written": (["jobs/pretrain.py", "--preset", "test", "--data", "{half}", "--out", "{out}"],
                                     ["--data", "no manifest.json", "has not finished"]),
    "finetune --data half-written": (["jobs/finetune.py", "--preset", "test", "--data", "{half}", "--out", "{out}"],
                                     ["--data", "no manifest.json"]),
    "finetune --init missing": (["jobs/finetune.py", "--preset", "test", "--data", "{data}", "--init", "{missing}",
                                 "--out", "{out}"], ["--init", "no such directory"]),
    "finetune --init half-written": (["jobs/finetune.py", "--preset", "test", "--data", "{data}", "--init",
                                      "{half_run}", "--out", "{out}"], ["--init", "not a finished run", "--resume"]),
    "train_clip --coco-root missing": (["jobs/train_clip.py", "--preset", "test", "--coco-root", "{missing}",
                                        "--out", "{out}"], ["--coco-root", "no such directory"]),
    "train_clip --coco-root half-written": (["jobs/train_clip.py", "--preset", "test", "--coco-root", "{half}",
                                             "--out", "{out}"], ["--coco-root", "captions_train2017.json"]),
    "preprocess --coco-root missing": (["jobs/preprocess.py", "--preset", "test", "--coco-root", "{missing}",
                                        "--out", "{out}"], ["--coco-root", "not a directory"]),
    "evaluate --run missing": (["jobs/evaluate.py", "--run", "{missing}", "--data", "{data}"],
                               ["--run", "no such directory"]),
    "evaluate --data half-written": (["jobs/evaluate.py", "--run", "{run}", "--data", "{half}"],
                                     ["--data", "no manifest.json"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_missing_or_half_written_path_is_one_line(case, dirs):
    argv, expected = CASES[case]
    result = run_job([a.format(**dirs) for a in argv], ROOT)
    assert_one_clear_line(result, "error", *expected)


def test_instruct_that_is_not_llava_json_is_one_line(shapes, dirs):
    argv = ["jobs/preprocess.py", "--preset", "test", "--coco-root", str(shapes), "--instruct",
            str(dirs["not_llava"]), "--out", str(dirs["out"])]
    assert_one_clear_line(run_job(argv, ROOT), "error", str(dirs["not_llava"]), "list of conversations")


@pytest.mark.parametrize("job", ["pretrain", "preprocess"])
def test_a_ray_address_that_does_not_answer_is_one_line(job, shapes, dirs):
    address = f"127.0.0.1:{refused_port()}"
    argv = {"pretrain": ["jobs/pretrain.py", "--preset", "test", "--data", str(dirs["data"]), "--out",
                         str(dirs["out"])],
            "preprocess": ["jobs/preprocess.py", "--preset", "test", "--coco-root", str(shapes), "--out",
                           str(dirs["out"])]}[job]
    line = assert_one_clear_line(run_job(argv, ROOT, RAY_ADDRESS=address), address, "no Ray cluster answers")
    assert "unset RAY_ADDRESS" in line


def test_a_dashboard_url_as_ray_address_is_explained(dirs):
    argv = ["jobs/pretrain.py", "--preset", "test", "--data", str(dirs["data"]), "--out", str(dirs["out"])]
    result = run_job(argv, ROOT, RAY_ADDRESS="http://127.0.0.1:8265")
    assert_one_clear_line(result, "job-submission address", "ray job submit")


def test_a_job_under_a_python_without_the_project_says_what_to_do(tmp_path, dirs):
    """What `ray job submit -- python jobs/...` meets when the head was started outside the venv: the head's
    `python` is a bare interpreter. A venv without packages stands in for it."""
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)
    for job in ("pretrain", "make_shapes"):
        result = run_job([f"jobs/{job}.py", "--help"], ROOT, python=str(bare / "bin" / "python"))
        line = assert_one_clear_line(result, "error", "virtual environment", "ray start")
        assert str(bare) in line and "torch" in line


LISTENERS_OF_A_LOCAL_RAY = """
import psutil, ray
from trimodal.cli import init_ray
init_ray("local")
ray.get(ray.remote(lambda: 1).remote())  # a worker is up too
me = psutil.Process()
pids = {me.pid, *(c.pid for c in me.children(recursive=True))}
for conn in psutil.net_connections("tcp"):
    if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
        print(conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name())
ray.shutdown()
"""


def test_a_job_without_a_cluster_starts_a_local_ray_on_loopback_only(tmp_path):
    """Without the single-node switch in the environment (the suite sets it), as a user's shell runs a job."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", LISTENERS_OF_A_LOCAL_RAY], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) >= 3, result.stdout  # GCS, raylet, agents at least
    assert not [r for r in rows if not r[0].startswith(("127.", "::ffff:127.", "::1"))], rows


JOIN_OR_START = """
import ray
from trimodal.cli import init_ray
print("cpus", init_ray())
ray.shutdown()
"""


def test_a_stale_record_of_a_dead_cluster_is_reported_in_one_line_and_a_local_ray_starts():
    """Ray keeps <temp dir>/ray/ray_current_cluster after its cluster dies without `ray stop`; ray.init("auto")
    then waits minutes for the dead GCS. A job without RAY_ADDRESS says so in one line and starts a local Ray."""
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    try:
        (temp / "ray").mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed
        (temp / "ray" / "ray_current_cluster").write_text(dead)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
        result = subprocess.run([sys.executable, "-c", JOIN_OR_START], cwd=temp, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"the cluster last started on this machine ({dead}) no longer answers" in result.stderr
        assert "cpus" in result.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_a_job_on_its_own_local_ray_trains_without_the_placement_group_cleaners_noise(shapes, tmp_path):
    """Ray Train's placement-group cleaner polls the dashboard's state API, which a job's local Ray does not run: a
    warning a second on its own, a traceback when another Ray runs on the machine. Neither reaches the user."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "jobs/train_clip.py", "--preset", "test", "--coco-root", str(shapes),
                             "--out", str(tmp_path / "clip"), "--steps", "6", "--batch-size", "2"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert (tmp_path / "clip" / "tower" / "config.json").is_file(), out[-3000:]
    assert "PlacementGroupCleaner" not in out and "Failed to query Ray Train Controller" not in out, out[-3000:]
