"""Preprocess COCO captions + LLaVA-Instruct into Parquet with CLIP patch embeddings (Ray Data).

    python jobs/preprocess.py --preset cpu --coco-root runs/demo/shapes \\
        --instruct runs/demo/shapes/llava_instruct.json --instruct runs/demo/shapes/llava_instruct_val.json \\
        --out runs/demo/data
    ray job submit -- python jobs/preprocess.py ...        # on a running cluster (ray start --head)

Writes OUT/images/ (one float16 embedding row per unique image), OUT/captions/, OUT/conversations/ and
OUT/manifest.json. Re-running into the same --out OVERWRITES those tables (the new ones are built in
OUT/.tmp-*/ and swapped in at the end, so an interrupted run leaves the old output alone): same rows, never
duplicates. Corrupt, truncated or missing images are skipped and listed in the manifest; the rows that refer
to them are dropped and counted.
"""

from __future__ import annotations

import _project  # noqa: F401  (first: this job's own library, or one line saying why it cannot run)
import argparse
import sys
from dataclasses import replace

from trimodal.cli import ClusterUnreachableError, init_ray
from trimodal.config import ConfigError, load_config, preset_names
from trimodal.data.formats import AnnotationError
from trimodal.data.preprocess import (PipelineOptions, PreprocessError, build_plan, default_cpus_per_encoder,
                                      run_preprocess)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_choice = p.add_mutually_exclusive_group()
    config_choice.add_argument("--preset", default="cpu",
                               help=f"preset name ({', '.join(preset_names())}); default cpu")
    config_choice.add_argument("--config", default=None, help="a preset YAML file instead of --preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.vision.image_size=224 (repeatable)")
    p.add_argument("--coco-root", action="append", required=True, metavar="DIR",
                   help="COCO 2017 layout: annotations/captions_{train,val}2017.json + train2017/ val2017/ "
                        "(repeatable)")
    p.add_argument("--instruct", action="append", default=[], metavar="FILE",
                   help="LLaVA-Instruct JSON file whose images are in a --coco-root (repeatable)")
    p.add_argument("--out", required=True, help="output directory; its tables are overwritten")
    p.add_argument("--vision", default=None, metavar="DIR",
                   help="CLIP tower directory (e.g. the stage-0 one); default: the preset's")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N images (by id) of each split, and the rows about them")
    p.add_argument("--batch-size", type=int, default=None, help="images per CLIP batch (default: the preset's)")
    p.add_argument("--encoders", type=int, default=None, help="encoder actor pool size (default: the preset's)")
    p.add_argument("--gpus-per-encoder", type=float, default=0.0, help="GPUs per encoder actor (default 0)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (default: RAY_ADDRESS, else a running `ray start` cluster, else a new "
                        "local instance on 127.0.0.1; 'local' always starts a new one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config or args.preset, list(args.set))
        plan = build_plan(args.coco_root, args.instruct, limit=args.limit)
        options = PipelineOptions(
            batch_size=cfg.data.preprocess_batch_size if args.batch_size is None else args.batch_size,
            encoders=cfg.data.encoders if args.encoders is None else args.encoders,
            gpus_per_encoder=args.gpus_per_encoder).validate()
        cpus = default_cpus_per_encoder(init_ray(args.address), options.encoders, options.gpus_per_encoder)
        options = replace(options, cpus_per_encoder=cpus)
        manifest = run_preprocess(plan, cfg.model.vision, args.out, options, vision_dir=args.vision)
    except (AnnotationError, PreprocessError, ConfigError, ClusterUnreachableError) as e:
        print(f"[preprocess] error: {e}", file=sys.stderr)
        return 2
    skipped = manifest["skipped"]["count"]
    print(f"[preprocess] skipped images: {skipped}" + (" (reasons in manifest.json)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
