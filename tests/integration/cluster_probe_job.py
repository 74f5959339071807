"""A Ray Train job that asks for exactly the phi2 preset's stage-1 workers, without needing a data set.

    ray job submit --working-dir . -- python tests/integration/cluster_probe_job.py --storage DIR

The ScalingConfig and TorchConfig are the ones jobs/pretrain.py builds for the phi2 preset
(`trimodal.training.scaffold.scaling_config` / `torch_config` of phi2's stage1: one worker, use_gpu, accelerator_type
A100-40G, 8 CPUs); only the training loop is a stand-in (one report), because the real one needs the preprocessed
data that make_shapes and preprocess write first. tests/integration/test_cluster_autoscaling.py submits it to a
cluster whose node types cannot hold that request, where the autoscaler must report it infeasible.
"""

from __future__ import annotations

import argparse
import sys

import ray


def train_loop(config: dict) -> None:
    """One report from each worker: the request was granted."""
    import ray.train

    ray.train.report({"started": 1})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", required=True, help="Ray Train storage path")
    p.add_argument("--preset", default="phi2", help="the preset whose stage-1 workers are asked for")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from trimodal.config import load_config
    from trimodal.training.scaffold import scaling_config, torch_config

    stage = load_config(args.preset).stage1
    scaling = scaling_config(stage)
    print(f"[probe] stage-1 workers of {args.preset}: {scaling.num_workers} x {scaling.resources_per_worker}, "
          f"accelerator_type {scaling.accelerator_type}", flush=True)
    ray.init()  # RAY_ADDRESS, which `ray job submit` sets
    try:
        trainer = TorchTrainer(train_loop, scaling_config=scaling, torch_config=torch_config(stage),
                               run_config=RunConfig(name="probe", storage_path=args.storage))
        return 0 if trainer.fit().metrics.get("started") == 1 else 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
