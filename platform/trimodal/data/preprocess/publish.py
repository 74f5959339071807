"""Publishing: OUT/.tmp-<id>/ swapped into OUT/ table by table, the manifest first out and last in; and the
manifest itself.

Why not `trimodal.files.publish_dir`: that replaces a whole folder in one rename, so it would write the scratch
folder beside OUT (not inside it), remove everything else a user keeps in OUT, and leave interrupted scratch
folders beside OUT for nobody to clean up. Here the three tables are swapped one by one inside OUT, and readers
never see a manifest that describes tables other than the ones beside it: the old manifest is removed before
the first table moves and the new one arrives after the last.
"""

from __future__ import annotations

import os
import platform as _platform
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from trimodal.data.preprocess.images import ImagePass
from trimodal.data.preprocess.pipeline import PipelineOptions
from trimodal.data.preprocess.plan import Plan
from trimodal.data.readers import FORMAT_VERSION, MANIFEST, TABLES

_SCRATCH = re.compile(r"^\.(tmp|old)-[0-9a-f]{12}$")


def scratch_dir(out: Path) -> Path:
    """A fresh OUT/.tmp-<id>/ ; scratch folders left by interrupted runs are removed first."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if _SCRATCH.match(stale.name) and stale.is_dir():
            shutil.rmtree(stale)
    tmp = out / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished tables into OUT. The old manifest goes first, so an interruption in between leaves
    OUT without a manifest (readers refuse it) rather than a manifest that describes other tables."""
    (out / MANIFEST).unlink(missing_ok=True)
    old = out / f".old-{uuid.uuid4().hex[:12]}"
    old.mkdir()
    for name in TABLES:
        if (out / name).exists():
            os.replace(out / name, old / name)
        os.replace(tmp / name, out / name)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    shutil.rmtree(old)
    tmp.rmdir()


def split_counts(image_splits: Counter, captions: pa.Table, conversations: pa.Table) -> dict[str, dict[str, int]]:
    """Rows per split and table."""
    out: dict[str, dict[str, int]] = {}
    for name, splits in (("images", image_splits), ("captions", Counter(captions["split"].to_pylist())),
                         ("conversations", Counter(conversations["split"].to_pylist()))):
        for split, n in splits.items():
            out.setdefault(split, {"images": 0, "captions": 0, "conversations": 0})[name] = n
    return dict(sorted(out.items()))


def versions() -> dict[str, str]:
    """Versions of what produced the files."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": _platform.python_version()}
    for name in ("trimodal", "ray", "torch", "transformers", "pyarrow", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def build_manifest(plan: Plan, info: Any, options: PipelineOptions, images: ImagePass, captions: pa.Table,
                   conversations: pa.Table, dropped: dict[str, int], vision_dir: str | Path | None,
                   wall_s: float) -> dict[str, Any]:
    """The manifest.json document."""
    skipped_ids = {row["image_id"] for row in images.skipped}
    image_splits = Counter(i.split for i in plan.images if i.image_id not in skipped_ids)
    counts = plan.counts
    return {
        "format_version": FORMAT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"images": images.written, "captions": captions.num_rows,
                   "conversations": conversations.num_rows,
                   "text_only_conversations": int(conversations["image_id"].null_count)},
        "splits": split_counts(image_splits, captions, conversations),
        "encoder": {"model_id": info.model_id, "untrained": info.untrained, "image_size": info.image_size,
                    "num_patches": info.num_patches, "hidden_size": info.hidden_size},
        "embedding": {"shape": [info.num_patches, info.hidden_size], "dtype": "float16",
                      "arrow_type": "ray.data.extensions.ArrowTensorTypeV2 (fixed shape)"},
        "throughput": {"images_per_s": images.written / max(images.seconds, 1e-9),
                       "encode_seconds": images.seconds, "first_batch_seconds": images.first_batch_seconds,
                       "wall_seconds": wall_s},
        "skipped": {"count": len(images.skipped), "images": images.skipped},
        "dropped": {"captions": dropped["captions"], "conversations": dropped["conversations"],
                    "conversations_unknown_image": counts["conversations_unknown_image"]},
        "duplicates_removed": {k: counts[k] for k in ("duplicate_images", "duplicate_captions",
                                                      "duplicate_conversations")},
        "limited": {k: counts[f"limited_{k}"] for k in ("images", "captions", "conversations")},
        "inputs": {**plan.inputs, "vision_dir": str(Path(vision_dir).resolve()) if vision_dir else None},
        "options": asdict(options),
        "pipeline": images.operators,
        "notes": plan.notes,
        "versions": versions(),
    }
