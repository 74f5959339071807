"""Stage 1 on Ray Train: the projector learns to map CLIP patch features into the frozen LM (captions).

    python jobs/pretrain.py --preset cpu --data runs/demo/data --out runs/demo/pretrain
    ray job submit --working-dir . -- python jobs/pretrain.py --preset phi2 --data ... --out ...

Reads the preprocessed Parquet (jobs/preprocess.py), never re-encodes images, checkpoints every
--checkpoint-every steps, and exports OUT/final/ for stage 2, evaluation and serving.
"""

import _project  # noqa: F401  (first: this job's own library, or one line saying why it cannot run)
import argparse
import sys
from pathlib import Path

from trimodal.cli import add_common_args, init_ray, load_job_config, require_data_dir, run_job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, stage=1)
    parser.add_argument("--data", required=True, type=Path, help="the jobs/preprocess.py output directory")
    args = parser.parse_args()

    def job() -> None:
        from trimodal.training.trainer import run_stage

        require_data_dir(args.data)
        cfg = load_job_config(args, stage=1)
        init_ray()
        final = run_stage(cfg, 1, args.data, args.out, resume=args.resume)
        print(f"[stage 1] done: {final}")

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
