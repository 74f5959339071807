"""Stage 0: train a tiny CLIP contrastively on COCO-layout caption data (where no pretrained CLIP exists).

    python jobs/train_clip.py --coco-root runs/demo/shapes --out runs/demo/clip
    ray job submit -- python jobs/train_clip.py --coco-root ... --out ...

Writes OUT/tower (a CLIPModel directory that CLIPVisionModel.from_pretrained loads) and prints zero-shot caption
accuracy on the held-out split. Use it with `jobs/preprocess.py --vision OUT/tower`.
"""

import _project  # noqa: F401  (first: this job's own library, or one line saying why it cannot run)
import argparse
import sys
from pathlib import Path

from trimodal.cli import add_common_args, init_ray, load_job_config, require_coco_root, run_job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, stage=0)
    parser.add_argument("--coco-root", required=True, type=Path, help="COCO layout: annotations/, train2017/, val2017/")
    args = parser.parse_args()

    def job() -> None:
        from trimodal.training.clip import run_stage0

        require_coco_root(args.coco_root)
        cfg = load_job_config(args, stage=0)
        init_ray()
        tower = run_stage0(cfg, args.coco_root, args.out, resume=args.resume)
        print(f"[stage 0] tower saved to {tower}")

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
