"""Shared plumbing for the thin entry points in jobs/: common flags, config loading, Ray start, clean errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from trimodal.config import ConfigError, TrimodalConfig, load_config, preset_names


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


def init_ray(address: str | None = None) -> float:
    """Attach to `address`, else to RAY_ADDRESS (set by `ray job submit`) or the cluster `ray start` left running;
    with none of those (or address "local"), start a local instance bound to 127.0.0.1. Returns the cluster's CPUs."""
    import ray

    if not ray.is_initialized():
        if address is None:
            try:
                ray.init(address="auto")
            except ConnectionError:
                address = "local"
        if address == "local":
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
        elif address is not None:
            ray.init(address=address)
    return float(ray.cluster_resources().get("CPU", 1))


def run_job(job: Callable[[], None]) -> int:
    """Run a job; expected failures print one clear line and exit 2."""
    from trimodal.data.formats import AnnotationError
    from trimodal.sources import SourceError
    from trimodal.training.trainer import RunExistsError

    try:
        job()
    except (ConfigError, AnnotationError, SourceError, RunExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
