"""Open a preprocessed directory (written by `trimodal.data.preprocess`) as Ray Datasets for training.

    ds = open_stage1("runs/demo/data", split="train")   # {image_id, caption, embedding [N, D] float16}
    ds = open_stage2("runs/demo/data", split="train")   # {id, image_id, turns, embedding [N, D] float16}

The embedding rows are joined to the caption / conversation rows here, so training never re-encodes an image.
The join is a broadcast hash join: the text rows of one split (small: COCO has ~600K captions, LLaVA-Instruct
150K conversations) are put in the object store once, and each block of the (large) image table is matched
against them in a parallel task; embeddings are never shuffled. Output row order is not defined.

Text-only conversations (no image) are not in `open_stage2`: Ray Data cannot turn a tensor column holding
nulls into numpy batches; `read_rows` returns them with the other conversation rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TABLES = ("images", "captions", "conversations")


class DataDirError(ValueError):
    """A preprocessed directory is missing, unfinished or from an incompatible version."""


@contextmanager
def ordered_execution() -> Iterator[None]:
    """Ray Data datasets executed inside keep their input order. By default a block whose task finishes first
    comes first, so on a busy machine the same input reaches training in another order (another first batch)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = saved


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished preprocessing run; raises DataDirError when there is none."""
    root = Path(data_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise DataDirError(f"{root}: no {MANIFEST}; preprocessing has not finished there "
                           f"(run jobs/preprocess.py --out {root})")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataDirError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}; "
                           "re-run jobs/preprocess.py")
    missing = [t for t in TABLES if not (root / t).is_dir()]
    if missing:
        raise DataDirError(f"{root}: missing tables {missing}; re-run jobs/preprocess.py")
    return manifest


def embedding_shape(manifest: dict[str, Any]) -> tuple[int, int]:
    """(patches, dim) of every embedding in the directory."""
    patches, dim = manifest["embedding"]["shape"]
    return int(patches), int(dim)


def splits(manifest: dict[str, Any]) -> list[str]:
    """The splits present (e.g. ["train", "val"])."""
    return sorted(manifest["splits"])


def _check_split(manifest: dict[str, Any], data_dir: str | Path, split: str) -> None:
    if split not in manifest["splits"]:
        raise DataDirError(f"{data_dir}: no {split!r} split (present: {splits(manifest)})")


def read_rows(data_dir: str | Path, table: str, split: str, columns: list[str]) -> pa.Table:
    """One split of a small table (captions or conversations), read on the driver with pyarrow."""
    return pq.read_table(Path(data_dir) / table, columns=columns, filters=[("split", "==", split)])


def attach_embeddings(images: pa.Table, rows: pa.Table) -> pa.Table:
    """Rows whose image_id is in `images`, each with that image's embedding column appended (a hash join on
    image_id: `images` has unique ids; rows of other images are left out)."""
    ids = images["image_id"].combine_chunks()
    matched = rows.filter(pc.fill_null(pc.is_in(rows["image_id"], value_set=ids), False))
    position = pc.index_in(matched["image_id"], value_set=ids)
    return matched.append_column("embedding", images["embedding"].take(position))


def _attach_shared(images: pa.Table, rows: Any) -> pa.Table:
    """`attach_embeddings` against a rows table held in the object store (one copy for all tasks)."""
    import ray

    return attach_embeddings(images, ray.get(rows[0]))


def _join(data_dir: str | Path, split: str, rows: pa.Table) -> "ray.data.Dataset":  # noqa: F821
    import ray
    import ray.data
    from ray.data.expressions import col

    images = ray.data.read_parquet(str(Path(data_dir) / "images")).select_columns(["image_id", "embedding", "split"])
    images = images.filter(expr=col("split") == split)
    # The ref is wrapped in a list: Ray Data would not resolve a bare ObjectRef argument for the UDF.
    return images.map_batches(_attach_shared, batch_format="pyarrow", batch_size=None,
                              fn_kwargs={"rows": [ray.put(rows)]})


def open_stage1(data_dir: str | Path, split: str = "train") -> "ray.data.Dataset":  # noqa: F821
    """Stage 1 rows: {image_id, caption, embedding (float16 [patches, dim])}, one per caption of `split`."""
    manifest = read_manifest(data_dir)
    _check_split(manifest, data_dir, split)
    return _join(data_dir, split, read_rows(data_dir, "captions", split, ["image_id", "caption"]))


def open_stage2(data_dir: str | Path, split: str = "train") -> "ray.data.Dataset":  # noqa: F821
    """Stage 2 rows: {id, image_id, turns [{role, text}], embedding}, one per conversation with an image."""
    manifest = read_manifest(data_dir)
    _check_split(manifest, data_dir, split)
    rows = read_rows(data_dir, "conversations", split, ["id", "image_id", "turns"])
    return _join(data_dir, split, rows.filter(pc.is_valid(rows["image_id"])))
