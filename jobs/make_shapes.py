"""Generate the synthetic "shapes" set in COCO + LLaVA-Instruct format.

    python jobs/make_shapes.py --out runs/demo/shapes --train 2000 --val 200 --seed 0
"""

from __future__ import annotations

import _project  # noqa: F401  (first: this job's own library, or one line saying why it cannot run)
import argparse

from trimodal.data.shapes import write_shapes_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created; re-running is idempotent)")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--val", type=int, default=200, help="held-out images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args(argv)
    try:
        summary = write_shapes_dataset(args.out, n_train=args.train, n_val=args.val, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(f"[make_shapes] {summary.out_dir}: {summary.n_train} train + {summary.n_val} val images "
          f"(seed {summary.seed}), {summary.n_captions} captions, {summary.n_conversations} conversations, "
          f"{summary.n_questions} questions")
    print(f"[make_shapes] images written {summary.images_written}, unchanged "
          f"{summary.n_train + summary.n_val - summary.images_written}, stale removed {summary.images_removed}")
    for path in summary.files:
        print(f"[make_shapes] wrote {path}")
    print(f"[make_shapes] done in {summary.seconds:.1f} s")


if __name__ == "__main__":
    main()
