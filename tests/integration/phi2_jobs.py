"""The phi2 rehearsal's pieces shared by the tests that run its jobs: the offline weights, the five jobs' command
lines as docs/cluster.md submits them, the runtime environment they are submitted with, and the Serve config file
pointed at a run.

Loaded by tests/integration/test_phi2_rehearsal.py (one token-authenticated local head) and
tests/integration/test_cluster_autoscaling.py (the fake autoscaling cluster built from cluster.yaml).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHAPES = ("--train", "8", "--val", "4", "--seed", "0")
"""The synthetic shapes data set: 8 training and 4 held-out images."""
SCHEDULE = ("--steps", "2", "--checkpoint-every", "1")
"""The one non-hardware change to the recipe: 2 steps per stage instead of its 20,000."""
RUNTIME_EXCLUDES = (".venv", ".venv-vllm", "runs", ".git", "*.egg-info", "__pycache__")
"""What docs/cluster.md leaves out of the uploaded working dir."""
RUNTIME_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
"""The environment variables docs/cluster.md submits every job with."""


@dataclass(frozen=True)
class Job:
    """One rehearsal job: its name and the command after `python`."""

    name: str
    """make_shapes's `shapes`, then preprocess, pretrain, finetune, evaluate."""
    argv: tuple[str, ...]
    """The script (relative to the working dir) and its arguments."""


@dataclass(frozen=True)
class GpuRequests:
    """The GPU resources the jobs ask for beyond their ScalingConfig (all zero/None: everything in the driver)."""

    encoder_gpus: float = 0.0
    """jobs/preprocess.py --gpus-per-encoder (0: CPU encoder actors)."""
    eval_gpus: float = 0.0
    """jobs/evaluate.py --gpus (0: the evaluation runs in the job's driver)."""
    eval_accelerator: str | None = None
    """jobs/evaluate.py --accelerator-type, with eval_gpus."""


def runtime_env(root: Path = ROOT) -> dict:
    """What docs/cluster.md submits with: the working dir without venvs and runs, the library as a py_module.

    Paths are absolute (the Job API client uploads them), so it does not depend on the submitting process's cwd.
    """
    return {"working_dir": str(root), "excludes": list(RUNTIME_EXCLUDES),
            "py_modules": [str(root / "platform" / "trimodal")], "env_vars": dict(RUNTIME_ENV_VARS)}


def build_weights(out: Path, env: dict[str, str], timeout_s: float = 300) -> list[str]:
    """`python -m trimodal rehearsal-weights --out OUT`: a tiny random Phi with Phi-2's tokenizer and a random
    TinyCLIP-61M/32-shaped tower, built offline. Returns the two `key=value` overrides it prints."""
    done = subprocess.run([str(BIN / "python"), "-m", "trimodal", "rehearsal-weights", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, f"rehearsal-weights exited {done.returncode}:\n{printed[-6000:]}"
    overrides = [line.strip() for line in printed.splitlines() if line.startswith("model.")]
    assert len(overrides) == 2, printed
    return overrides


def sets(*overrides: str) -> list[str]:
    """`--set key=value` for each override."""
    return [arg for o in overrides for arg in ("--set", o)]


def phi2_jobs(runs: Path, overrides: list[str], gpus: GpuRequests = GpuRequests()) -> list[Job]:
    """make_shapes, preprocess, pretrain, finetune and evaluate on the phi2 preset, in order, writing under
    `runs`; `overrides` (key=value) go to every job that builds a model."""
    shapes, data = runs / "shapes", runs / "data"
    model = sets(*overrides)
    encoder = ["--gpus-per-encoder", f"{gpus.encoder_gpus:g}"] if gpus.encoder_gpus else []
    evaluation = (["--gpus", f"{gpus.eval_gpus:g}"] if gpus.eval_gpus else []) + (
        ["--accelerator-type", gpus.eval_accelerator] if gpus.eval_gpus and gpus.eval_accelerator else [])
    return [
        Job("shapes", ("jobs/make_shapes.py", "--preset", "phi2", "--out", str(shapes), *SHAPES)),
        Job("preprocess", ("jobs/preprocess.py", "--preset", "phi2", *model, "--coco-root", str(shapes),
                           "--instruct", str(shapes / "llava_instruct.json"),
                           "--instruct", str(shapes / "llava_instruct_val.json"), "--out", str(data), *encoder)),
        Job("pretrain", ("jobs/pretrain.py", "--preset", "phi2", *model, "--data", str(data),
                         "--out", str(runs / "pretrain"), *SCHEDULE)),
        Job("finetune", ("jobs/finetune.py", "--preset", "phi2", *model, "--data", str(data),
                         "--init", str(runs / "pretrain"), "--out", str(runs / "finetune"), *SCHEDULE)),
        Job("evaluate", ("jobs/evaluate.py", "--run", str(runs / "finetune"), "--data", str(data), *evaluation)),
    ]


def serve_config_for_run(run: Path, runs_dir: Path, port: int, args: dict[str, object]) -> dict:
    """serve_app/serve_config.yaml with its run, runs directory and HTTP port pointed at a test's run, and `args`
    (key=value overrides of the app's args, e.g. the weights) added; the deployments are left as the file has
    them."""
    config = yaml.safe_load((ROOT / "serve_app" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    app_args = config["applications"][0]["args"]
    app_args.update({"run": str(run), "runs_dir": str(runs_dir), **args})
    return config
