"""Preprocessing: COCO captions + LLaVA-Instruct -> Parquet with CLIP patch embeddings.

    plan = build_plan(["data/coco"], ["data/llava_instruct_150k.json"], limit=None)
    manifest = run_preprocess(plan, cfg.model.vision, "runs/demo/data", PipelineOptions(batch_size=32, encoders=2))

One job per module:
    plan.py      which images to encode and which rows to write (annotation files -> `Plan`; no Ray)
    pipeline.py  the Ray Data pipeline: decode tasks -> a fixed pool of CLIP encoder actors
    images.py    the image pass: the pipeline's rows streamed into OUT/images, unreadable images collected
    parquet.py   the Parquet writer (schema of OUT/images, row groups and files of a set size)
    publish.py   OUT/.tmp-<id>/ swapped into OUT/, and manifest.json

One streaming Ray Data execution over the unique images (sorted by image_id, cut into batches of `batch_size`):

    from_pandas(one block per batch of image records)
      -> map_batches(decode_images)    parallel Ray tasks: read, decode, CLIP resize/crop/normalise
      -> map_batches(ClipEncoder)      fixed actor pool, the tower loaded once per actor: float16 patch features
      -> iter_batches on the driver    OUT/images/*.parquet in image_id order; unreadable images collected

An unreadable image (missing, truncated, not an image) flows through as a row with an `error` and no features,
so one pass both writes the embeddings and lists what was skipped. The driver then writes the caption and
conversation tables (small, already in memory) without the rows whose image was skipped, and the manifest.
Everything is written under OUT/.tmp-<id>/ and swapped into place at the end (see `publish.publish`).

Output (`OUT/`):
    images/         image_id int64, embedding fixed-shape tensor [patches, dim] float16, width, height, file_name, split
    captions/       image_id, caption, split
    conversations/  id, image_id (null: text-only), turns list<struct<role, text>>, split
    manifest.json   counts, encoder, embedding shape, throughput, skipped images, dropped rows, inputs, versions
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trimodal.config import VisionConfig
from trimodal.data.preprocess.images import encode_images
from trimodal.data.preprocess.parquet import write_table
from trimodal.data.preprocess.pipeline import PipelineOptions, default_cpus_per_encoder, pin_vision, tower_info
from trimodal.data.preprocess.plan import Log, Plan, PreprocessError, build_plan, drop_rows_of, print_log
from trimodal.data.preprocess.publish import build_manifest, publish, scratch_dir
from trimodal.data.readers import MANIFEST

__all__ = ["Plan", "PipelineOptions", "PreprocessError", "build_plan", "default_cpus_per_encoder", "run_preprocess"]


def run_preprocess(plan: Plan, vision: VisionConfig, out_dir: str | Path, options: PipelineOptions,
                   vision_dir: str | Path | None = None, log: Log = print_log) -> dict[str, Any]:
    """Encode the plan's images and write OUT (replacing its tables); returns the manifest."""
    start = time.perf_counter()
    options = options.validate()
    out = Path(out_dir).resolve()
    vision, directory = pin_vision(vision, vision_dir)
    info = tower_info(vision, directory)
    if info.untrained:
        log(f"note: the vision tower is UNTRAINED ({info.model_id}); run stage 0 (jobs/train_clip.py) for "
            "real features")
    tmp = scratch_dir(out)
    log(f"{len(plan.images)} unique images, {plan.captions.num_rows} captions, {plan.conversations.num_rows} "
        f"conversations; encoder {info.model_id} -> [{info.num_patches}, {info.hidden_size}] float16; "
        f"{options.encoders} encoder(s) x {options.cpus_per_encoder:g} CPU / {options.gpus_per_encoder:g} GPU, "
        f"batch {options.batch_size}")
    images = encode_images(plan, vision, directory, tmp, options, info, log)
    skipped_ids = {row["image_id"] for row in images.skipped}
    captions, dropped_captions = drop_rows_of(plan.captions, skipped_ids)
    conversations, dropped_conversations = drop_rows_of(plan.conversations, skipped_ids)
    write_table(captions, tmp / "captions")
    write_table(conversations, tmp / "conversations")
    manifest = build_manifest(plan, info, options, images, captions, conversations,
                              {"captions": dropped_captions, "conversations": dropped_conversations},
                              vision_dir, time.perf_counter() - start)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    publish(tmp, out)
    log(f"wrote {out}: {images.written} images, {captions.num_rows} captions, {conversations.num_rows} "
        f"conversations; {len(images.skipped)} images skipped ({dropped_captions} captions, "
        f"{dropped_conversations} conversations dropped); {manifest['throughput']['images_per_s']:.1f} images/s, "
        f"{manifest['throughput']['wall_seconds']:.1f} s")
    return manifest
