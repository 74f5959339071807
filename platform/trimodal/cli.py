"""Shared plumbing for the thin entry points in jobs/: common flags, config loading, Ray start, clean errors."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Callable, TypeVar

from trimodal.config import ConfigError, TrimodalConfig, load_config, preset_names

T = TypeVar("T")


def add_common_args(parser: argparse.ArgumentParser, stage: int | None = None) -> None:
    """--preset/--config/--set, and for training stages --out, --steps, --batch-size, --lr, workers, resume."""
    parser.add_argument("--preset", default="cpu", help=f"preset name ({', '.join(preset_names())})")
    parser.add_argument("--config", type=Path, default=None, help="a YAML config file (instead of --preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set data.max_length=128 (repeatable)")
    if stage is None:
        return
    parser.add_argument("--out", required=True, type=Path, help="the run directory")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step per worker")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --out (a fresh start if there is none)")


def load_job_config(args: argparse.Namespace, stage: int | None = None) -> TrimodalConfig:
    """The preset (or --config) with --set overrides and, for a stage, its command-line flags applied."""
    cfg = load_config(args.config or args.preset, list(args.set))
    if stage is None:
        return cfg
    from trimodal.training.trainer import with_stage_overrides

    return with_stage_overrides(cfg, stage, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                num_workers=args.num_workers, use_gpu=args.use_gpu,
                                checkpoint_every=args.checkpoint_every)


class JobInputError(ValueError):
    """A job's input is missing or unfinished: reported in one line, before Ray starts."""


class ClusterUnreachableError(ConnectionError):
    """The Ray cluster a job was pointed at does not answer."""


COCO_LAYOUT = ("annotations/captions_train2017.json", "annotations/captions_val2017.json", "train2017")
"""What --coco-root must hold (val2017/ may be empty)."""


def require_data_dir(path: Path, flag: str = "--data") -> None:
    """A finished jobs/preprocess.py output (its manifest is read in milliseconds, before Ray starts)."""
    from trimodal.data.readers import DataDirError, read_manifest

    if not path.is_dir():
        raise JobInputError(f"{flag} {path}: no such directory (write it with jobs/preprocess.py --out {path})")
    try:
        read_manifest(path)
    except DataDirError as exc:
        raise JobInputError(f"{flag} {exc}") from None


def require_run(path: Path, flag: str) -> None:
    """A finished training run: its directory or its final/, holding run.json."""
    final = path / "final" if (path / "final").is_dir() else path
    if (final / "run.json").is_file():
        return
    if not path.exists():
        raise JobInputError(f"{flag} {path}: no such directory")
    raise JobInputError(f"{flag} {path}: not a finished run (no final/run.json); finish it by re-running its "
                        "training job with --resume")


def require_coco_root(path: Path, flag: str = "--coco-root") -> None:
    """The COCO 2017 layout (annotations + image folders), checked by name only."""
    if not path.is_dir():
        raise JobInputError(f"{flag} {path}: no such directory")
    for rel in COCO_LAYOUT:
        if not (path / rel).exists():
            raise JobInputError(f"{flag} {path}: no {rel} (expected the COCO 2017 layout: "
                                "annotations/captions_{train,val}2017.json, train2017/, val2017/)")


def check_cluster_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when a cluster address does not answer (ray.init would retry for minutes)."""
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachableError(
            f"RAY_ADDRESS={address} is a dashboard / job-submission address; a job needs the cluster's GCS address "
            "(e.g. 127.0.0.1:6379), or submit it with `ray job submit --address " + address + " -- python ...`")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ClusterUnreachableError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start it (`ray start --head`, "
            "make jobs) or unset RAY_ADDRESS to run on a new local Ray") from None


def init_ray(address: str | None = None) -> float:
    """Attach to `address`, else to RAY_ADDRESS (set by `ray job submit`) or the cluster `ray start` left running
    (if it still answers); with none of those (or address "local"), start a local instance bound to 127.0.0.1.
    Returns the cluster's CPUs."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or recorded_cluster() or "local"
        if address == "local":
            start_local_ray()
        else:
            check_cluster_address(address)
            ray.init(address=address)
    return float(ray.cluster_resources().get("CPU", 1))


def recorded_cluster() -> str | None:
    """The cluster `ray start` recorded last on this machine (what ray.init("auto") would join), if it answers.

    Ray records it in <temp dir>/ray/ray_current_cluster and does not remove the record when that cluster dies
    without `ray stop`; ray.init("auto") then waits minutes for the dead GCS. A record that does not answer a TCP
    connection in 2 s is reported in one line and ignored.
    """
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    if not address:
        return None
    try:
        check_cluster_address(address, timeout_s=2.0)
    except ClusterUnreachableError:
        print(f"[ray] the cluster last started on this machine ({address}) no longer answers; starting a local Ray",
              file=sys.stderr)
        return None
    return address


def start_local_ray() -> None:
    """A new single-node Ray whose every port (GCS, raylet, agents, workers) listens on 127.0.0.1 only.

    Ray replaces a 127.0.0.1 node address with the machine's own address unless its single-node switch is on
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported, which the jobs have done by now); the switch is
    set for this start only, so attaching to a real cluster is unaffected.
    """
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
             runtime_env={"worker_process_setup_hook": "trimodal.cli.quiet_placement_group_cleaner"})


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Worker setup of the local Ray: Ray Train's placement-group cleaner logs errors only, and asks this Ray.

    The cleaner asks the dashboard's state API once a second whether the training controller still lives, and warns
    each time it cannot; a local Ray runs no dashboard, so every stage would print a warning a second. Its job, freeing
    the placement group of a controller that died, is done here by the local Ray ending with the job's process."""
    import logging

    import ray

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    # The state API finds its cluster from RAY_ADDRESS, else by looking for every Ray on the machine, and fails when
    # it finds several (another job's local Ray, a demo's head): a worker names its own, as a submitted job's do.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def on_gpu_node(job: Callable[[], T], num_gpus: float, accelerator_type: str | None = None) -> T:
    """Run `job` as a Ray task that holds `num_gpus` GPUs (of `accelerator_type`, when given) and return its result.

    A job's driver runs on the cluster's head, which has no GPU; the task is placed on a GPU node, and on an
    autoscaling cluster its request is what starts one. Errors raised in the task reach the caller as themselves.
    """
    import ray

    init_ray()
    task = ray.remote(num_gpus=num_gpus, num_cpus=1, accelerator_type=accelerator_type, max_retries=0)(job)
    print(f"[gpu] running on a node with {num_gpus:g} GPU{'s' if num_gpus != 1 else ''}"
          f"{f' ({accelerator_type})' if accelerator_type else ''}; waiting for one to be free", flush=True)
    return ray.get(task.remote())


def run_job(job: Callable[[], None]) -> int:
    """Run a job; expected failures (bad input, an unreachable or refusing cluster) print one line and exit 2."""
    from ray.exceptions import AuthenticationError

    from trimodal.data.formats import AnnotationError
    from trimodal.data.readers import DataDirError
    from trimodal.training.scaffold import RunExistsError
    from trimodal.weights.sources import SourceError

    try:
        job()
    except (ConfigError, AnnotationError, DataDirError, JobInputError, SourceError, RunExistsError,
            ClusterUnreachableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AuthenticationError as exc:
        print(f"error: the Ray cluster refused this job's token ({str(exc).splitlines()[0]}); export "
              "RAY_AUTH_MODE=token and use the cluster's token (~/.ray/auth_token)", file=sys.stderr)
        return 2
    return 0
