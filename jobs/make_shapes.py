"""Generate the synthetic "shapes" set in COCO + LLaVA-Instruct format.

    python jobs/make_shapes.py --out runs/demo/shapes                 # the cpu preset's sizes: 2000 / 400, seed 0
    python jobs/make_shapes.py --out runs/tiny --preset test --val 3  # a flag overrides the preset
"""

from __future__ import annotations

import _project  # noqa: F401  (first: this job's own library, or one line saying why it cannot run)
import argparse

from trimodal.config import load_config, preset_names
from trimodal.data.shapes.dataset import write_shapes_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_choice = parser.add_mutually_exclusive_group()
    config_choice.add_argument("--preset", default="cpu",
                               help=f"preset whose data sizes are the defaults ({', '.join(preset_names())}); "
                                    "default cpu")
    config_choice.add_argument("--config", default=None, help="a preset YAML file instead of --preset")
    parser.add_argument("--out", required=True, help="output directory (created; re-running is idempotent)")
    parser.add_argument("--train", type=int, default=None, help="training images (default: the preset's)")
    parser.add_argument("--val", type=int, default=None, help="held-out images (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the preset's)")
    args = parser.parse_args(argv)
    try:
        data = load_config(args.config or args.preset).data
        summary = write_shapes_dataset(
            args.out, n_train=data.shapes_train if args.train is None else args.train,
            n_val=data.shapes_val if args.val is None else args.val,
            seed=data.shapes_seed if args.seed is None else args.seed)
    except ValueError as e:  # a bad size or seed, or a ConfigError (a ValueError) naming the preset
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
