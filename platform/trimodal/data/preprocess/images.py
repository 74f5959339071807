"""The image pass: run the pipeline and stream its rows, in image_id order, into OUT/images; the rows that
could not be decoded become the skipped list."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trimodal.config import VisionConfig
from trimodal.data.preprocess.parquet import (TARGET_FILE_BYTES, TARGET_GROUP_BYTES, ParquetSink, image_schema,
                                              rows_per_group)
from trimodal.data.preprocess.pipeline import PipelineOptions, embedding_pipeline
from trimodal.data.preprocess.plan import Log, Plan
from trimodal.data.readers import ordered_execution


@dataclass
class ImagePass:
    """What the image pass wrote and skipped."""

    written: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """{image_id, file, split, reason} per image that could not be decoded."""
    seconds: float = 0.0
    first_batch_seconds: float = 0.0
    """Until the first batch (in image_id order) came back: mostly worker start-up and model loading."""
    in_order: bool = True
    """Rows arrived sorted by image_id (they should: the execution preserves order)."""
    operators: list[str] = field(default_factory=list)
    """The operators Ray Data ran, e.g. ["FromPandas", "MapBatches(decode_images)", "MapBatches(ClipEncoder)"]."""


class Progress:
    """A periodic progress line: images done / total, images/s, skipped so far."""

    def __init__(self, total: int, every_s: float, log: Log):
        self.total, self.every_s, self.log = total, every_s, log
        self.start = self.last = time.perf_counter()
        self.done = self.skipped = 0

    def update(self, done: int, skipped: int) -> None:
        self.done += done
        self.skipped += skipped
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(f"encoded {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f}%), "
                     f"{rate:.1f} images/s, {self.skipped} skipped, eta {eta:.0f} s")


def write_images(ds: "ray.data.Dataset", directory: Path, schema: pa.Schema, total: int,  # noqa: F821
                 options: PipelineOptions, log: Log) -> ImagePass:
    """Run the pipeline and stream its rows into OUT/images; failed rows become the skipped list."""
    row_bytes = int(np.prod(schema.field("embedding").type.shape)) * 2 + 64
    sink = ParquetSink(directory, schema, rows_per_group(row_bytes), TARGET_FILE_BYTES // TARGET_GROUP_BYTES)
    result, progress, last_id = ImagePass(), Progress(total, options.progress_every_s, log), -1
    start = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ok = pc.equal(batch["error"], "")
        good, bad = batch.filter(ok), batch.filter(pc.invert(ok))
        result.skipped += [{"image_id": r["image_id"], "file": r["path"], "split": r["split"], "reason": r["error"]}
                           for r in bad.select(["image_id", "path", "split", "error"]).to_pylist()]
        ids = batch["image_id"].to_numpy()
        result.in_order &= bool(ids.size == 0 or (ids[0] > last_id and np.all(np.diff(ids) > 0)))
        last_id = int(ids[-1]) if ids.size else last_id
        if good.num_rows:
            sink.write(good)
        progress.update(batch.num_rows, bad.num_rows)
        result.first_batch_seconds = result.first_batch_seconds or time.perf_counter() - start
    result.written = sink.close()
    result.seconds = time.perf_counter() - start
    result.operators = re.findall(r"^Operator \d+ (.+?): ", ds.stats(), flags=re.MULTILINE)
    return result


def encode_images(plan: Plan, vision: VisionConfig, directory: str | None, out: Path, options: PipelineOptions,
                  info: Any, log: Log) -> ImagePass:
    """The image pass: Ray Data pipeline -> OUT/images (order preserved so re-runs give identical files)."""
    schema = image_schema(info.num_patches, info.hidden_size)
    if not plan.images:
        ParquetSink(out / "images", schema, rows_per_group=1).close()
        return ImagePass()
    with ordered_execution():
        ds = embedding_pipeline(plan.images, vision, directory, info.image_size, options)
        result = write_images(ds, out / "images", schema, len(plan.images), options, log)
    if not result.in_order:
        log("warning: image rows arrived out of image_id order; the table is complete but not sorted")
    return result
