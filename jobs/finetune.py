"""Stage 2 on Ray Train: QLoRA (4-bit NF4 LM + LoRA adapters) and the projector, on multi-turn conversations.

    python jobs/finetune.py --preset cpu --data runs/demo/data --init runs/demo/pretrain --out runs/demo/finetune
    ray job submit --working-dir . -- python jobs/finetune.py --preset phi2 --data ... --init ... --out ...

Starts from the stage-1 projector (--init), trains only assistant turns (plus EOS), and exports OUT/final/.
"""

import _project  # noqa: F401  (first: this job's own library, or one line saying why it cannot run)
import argparse
import sys
from pathlib import Path

from trimodal.cli import add_common_args, init_ray, load_job_config, require_data_dir, require_run, run_job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, stage=2)
    parser.add_argument("--data", required=True, type=Path, help="the jobs/preprocess.py output directory")
    parser.add_argument("--init", type=Path, default=None, help="a finished stage-1 run (its dir or final/)")
    parser.add_argument("--no-quant", action="store_true", help="LoRA on the full-precision LM (no 4-bit)")
    args = parser.parse_args()

    def job() -> None:
        from trimodal.training.trainer import run_stage

        require_data_dir(args.data)
        if args.init is not None:
            require_run(args.init, "--init")
        cfg = load_job_config(args, stage=2)
        if args.init is None:
            print("[stage 2] warning: no --init stage-1 run: the projector starts untrained", file=sys.stderr)
        init_ray()
        final = run_stage(cfg, 2, args.data, args.out, resume=args.resume, init_run=args.init,
                          quantize=not args.no_quant)
        print(f"[stage 2] done: {final}")

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
