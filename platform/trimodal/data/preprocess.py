"""Preprocessing: COCO captions + LLaVA-Instruct -> Parquet with CLIP patch embeddings (DESIGN.md section 5).

    plan = build_plan(["data/coco"], ["data/llava_instruct_150k.json"], limit=None)
    manifest = run_preprocess(plan, cfg.model.vision, "runs/demo/data", PipelineOptions(batch_size=32, encoders=2))

One streaming Ray Data execution over the unique images (sorted by image_id, cut into batches of `batch_size`):

    from_pandas(one block per batch of image records)
      -> map_batches(decode_images)    parallel Ray tasks: read, decode, CLIP resize/crop/normalise
      -> map_batches(ClipEncoder)      fixed actor pool, the tower loaded once per actor: float16 patch features
      -> iter_batches on the driver    OUT/images/*.parquet in image_id order; unreadable images collected

An unreadable image (missing, truncated, not an image) flows through as a row with an `error` and no features,
so one pass both writes the embeddings and lists what was skipped. The driver then writes the caption and
conversation tables (small, already in memory) without the rows whose image was skipped, and the manifest.
Everything is written under OUT/.tmp-<id>/ and swapped into place at the end (see `publish`).

Output (`OUT/`):
    images/         image_id int64, embedding fixed-shape tensor [patches, dim] float16, width, height, file_name, split
    captions/       image_id, caption, split
    conversations/  id, image_id (null: text-only), turns list<struct<role, text>>, split
    manifest.json   counts, encoder, embedding shape, throughput, skipped images, dropped rows, inputs, versions
"""

from __future__ import annotations

import json
import os
import platform as _platform
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from io import BytesIO
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from trimodal.config import ModelSource, VisionConfig
from trimodal.data.formats import CocoImage, Conversation, read_coco_captions, read_llava_instruct, resolve_llava_image
from trimodal.data.readers import FORMAT_VERSION, MANIFEST, TABLES

_CAPTIONS_FILE = re.compile(r"^captions_(train|val)(\d{4})\.json$")
_SCRATCH = re.compile(r"^\.(tmp|old)-[0-9a-f]{12}$")
_TARGET_FILE_BYTES = 256 << 20
_TARGET_GROUP_BYTES = 64 << 20

Log = Callable[[str], None]


class PreprocessError(ValueError):
    """The inputs cannot be preprocessed as given (no annotation files, clashing image ids, ...)."""


def _print(message: str) -> None:
    print(f"[preprocess] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The plan: which images to encode and which rows to write (pure Python + Arrow, no Ray)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoSplit:
    """One split of a COCO root: its captions file and the folder that holds its images."""

    split: str
    """"train" or "val" (from captions_train2017.json / train2017/)."""
    annotation_file: Path
    image_dir: Path


@dataclass(frozen=True)
class ImageRecord:
    """One image to encode."""

    image_id: int
    path: str
    """Absolute path of the image file."""
    file_name: str
    split: str


@dataclass
class Plan:
    """Everything `run_preprocess` needs, read from the annotation files (which are validated on the way)."""

    images: list[ImageRecord]
    """Unique images referenced by a caption or a conversation, sorted by image_id."""
    captions: pa.Table
    """image_id, caption, split; sorted by (image_id, COCO annotation id)."""
    conversations: pa.Table
    """id, image_id (null for text-only), turns, split; sorted by (id, image_id), ties in input order."""
    inputs: dict[str, list[str]]
    """coco_roots, annotation_files, instruct_files (absolute paths)."""
    counts: Counter = field(default_factory=Counter)
    """Duplicates removed, conversations whose image no COCO file lists, rows left out by --limit."""
    notes: list[str] = field(default_factory=list)
    """Warnings worth keeping in the manifest (e.g. a split whose image folder is missing)."""


def find_coco_splits(root: str | Path) -> list[CocoSplit]:
    """The splits of a COCO root: `annotations/captions_{train,val}YYYY.json` with images in `{train,val}YYYY/`."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise PreprocessError(f"--coco-root {root}: not a directory")
    splits: dict[str, CocoSplit] = {}
    for path in sorted((root / "annotations").glob("captions_*.json")):
        match = _CAPTIONS_FILE.match(path.name)
        if match is None:
            continue
        split, year = match.groups()
        if split in splits:
            raise PreprocessError(f"{root}: two captions files for the {split} split "
                                  f"({splits[split].annotation_file.name}, {path.name}); keep one")
        splits[split] = CocoSplit(split, path, root / f"{split}{year}")
    if not splits:
        raise PreprocessError(f"{root}: no annotations/captions_train2017.json or captions_val2017.json "
                              "(expected the COCO 2017 layout)")
    return [splits[s] for s in sorted(splits)]


@dataclass
class _Catalog:
    """All COCO images and captions of the given roots."""

    images: dict[int, ImageRecord] = field(default_factory=dict)
    by_file_name: dict[str, CocoImage] = field(default_factory=dict)
    captions: list[tuple[int, int, str]] = field(default_factory=list)
    """(image_id, annotation id, caption)."""
    files: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def _add_split(catalog: _Catalog, split: CocoSplit) -> None:
    stats: dict[str, int] = {}
    images, captions = read_coco_captions(split.annotation_file, stats)
    catalog.files.append(str(split.annotation_file))
    catalog.counts["duplicate_images"] += stats.get("duplicate_images", 0)
    catalog.counts["duplicate_captions"] += stats.get("duplicate_captions", 0)
    for image in images.values():
        record = ImageRecord(image.id, str(split.image_dir / image.file_name), image.file_name, split.split)
        known = catalog.images.get(image.id)
        if known is not None and known != record:
            raise PreprocessError(f"image id {image.id} is listed twice: {known.path} and {record.path} "
                                  f"({split.annotation_file})")
        if image.file_name in catalog.by_file_name and catalog.by_file_name[image.file_name].id != image.id:
            raise PreprocessError(f"file name {image.file_name} belongs to image ids "
                                  f"{catalog.by_file_name[image.file_name].id} and {image.id}; "
                                  "LLaVA conversations could not tell them apart")
        catalog.images[image.id] = record
        catalog.by_file_name[image.file_name] = image
    catalog.captions += [(c.image_id, c.id, c.caption) for c in captions]


def load_coco(roots: Sequence[str | Path], log: Log = _print) -> _Catalog:
    """Read every captions file of every root (each root once); a split without its image folder is left out."""
    catalog = _Catalog()
    for root in dict.fromkeys(Path(r).resolve() for r in roots):
        for split in find_coco_splits(root):
            if not split.image_dir.is_dir():
                note = f"{split.annotation_file}: image folder {split.image_dir} is missing; split left out"
                log(f"warning: {note}")
                catalog.notes.append(note)
                continue
            _add_split(catalog, split)
    if not catalog.images:
        raise PreprocessError("no COCO split has both a captions file and its image folder")
    return catalog


def _conversation_rows(conversations: list[Conversation], catalog: _Catalog, counts: Counter) -> list[dict[str, Any]]:
    """Resolve each conversation's image to a COCO image id; the split is the image's. Text-only conversations
    take the split shared by the file's image conversations ("train" when mixed or none)."""
    rows = []
    for conv in conversations:
        turns = [{"role": t.role, "text": t.text} for t in conv.turns]
        if conv.image is None:
            rows.append({"id": conv.id, "image_id": None, "turns": turns, "split": None})
            continue
        image = resolve_llava_image(conv.image, catalog.by_file_name)
        if image is None:
            counts["conversations_unknown_image"] += 1
            continue
        rows.append({"id": conv.id, "image_id": image.id, "turns": turns,
                     "split": catalog.images[image.id].split})
    splits = {r["split"] for r in rows if r["image_id"] is not None}
    file_split = splits.pop() if len(splits) == 1 else "train"
    for row in rows:
        row["split"] = row["split"] or file_split
    return rows


def _dedupe_conversations(rows: list[dict[str, Any]], counts: Counter) -> list[dict[str, Any]]:
    """Drop identical conversations (same id, image and turns), e.g. one file given twice."""
    seen: set[str] = set()
    out = []
    for row in rows:
        key = json.dumps([row["id"], row["image_id"], row["turns"]], sort_keys=True)
        if key in seen:
            counts["duplicate_conversations"] += 1
            continue
        seen.add(key)
        out.append(row)
    return out


def _select_images(catalog: _Catalog, referenced: set[int], limit: int | None) -> list[ImageRecord]:
    """The referenced images sorted by id; with `limit`, the first `limit` of each split."""
    chosen = sorted(referenced)
    if limit is not None:
        per_split: Counter = Counter()
        kept = []
        for image_id in chosen:
            split = catalog.images[image_id].split
            if per_split[split] < limit:
                per_split[split] += 1
                kept.append(image_id)
        chosen = kept
    return [catalog.images[i] for i in chosen]


def build_plan(coco_roots: Sequence[str | Path], instruct_files: Sequence[str | Path] = (),
               limit: int | None = None, log: Log = _print) -> Plan:
    """Read and validate the annotation files; decide which images to encode and which rows to write.

    `limit` keeps the first `limit` images (by id) of each split and the rows that refer to them; text-only
    conversations are always kept. Raises `AnnotationError` naming the file for a malformed annotation file.
    """
    if limit is not None and limit < 1:
        raise PreprocessError(f"--limit must be >= 1, got {limit}")
    catalog = load_coco(coco_roots, log)
    counts = Counter(catalog.counts)
    conversations: list[dict[str, Any]] = []
    for path in dict.fromkeys(Path(p).resolve() for p in instruct_files):
        conversations += _conversation_rows(read_llava_instruct(path), catalog, counts)
    conversations = _dedupe_conversations(conversations, counts)
    referenced = {c[0] for c in catalog.captions} | {c["image_id"] for c in conversations if c["image_id"] is not None}
    images = _select_images(catalog, referenced, limit)
    keep = {image.image_id for image in images}
    captions = [c for c in catalog.captions if c[0] in keep]
    kept_conversations = [c for c in conversations if c["image_id"] is None or c["image_id"] in keep]
    counts.update(limited_images=len(referenced) - len(keep), limited_captions=len(catalog.captions) - len(captions),
                  limited_conversations=len(conversations) - len(kept_conversations))
    if counts["conversations_unknown_image"]:
        log(f"warning: {counts['conversations_unknown_image']} conversations name an image that no COCO captions "
            "file lists; left out")
    inputs = {"coco_roots": [str(Path(r).resolve()) for r in coco_roots], "annotation_files": catalog.files,
              "instruct_files": [str(Path(p).resolve()) for p in instruct_files]}
    return Plan(images, captions_table(captions, catalog), conversations_table(kept_conversations), inputs,
                counts, catalog.notes)


def captions_table(captions: list[tuple[int, int, str]], catalog: _Catalog) -> pa.Table:
    """(image_id, annotation id, caption) -> the captions table, sorted by (image_id, annotation id)."""
    ordered = sorted(captions)
    return pa.table({
        "image_id": pa.array([c[0] for c in ordered], pa.int64()),
        "caption": pa.array([c[2] for c in ordered], pa.string()),
        "split": pa.array([catalog.images[c[0]].split for c in ordered], pa.string()),
    })


TURN_TYPE = pa.list_(pa.struct([("role", pa.string()), ("text", pa.string())]))
CONVERSATION_SCHEMA = pa.schema([("id", pa.string()), ("image_id", pa.int64()), ("turns", TURN_TYPE),
                                 ("split", pa.string())])


def conversations_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Conversation rows -> the conversations table, sorted by (id, image_id); ties keep input order."""
    ordered = sorted(rows, key=lambda r: (r["id"], r["image_id"] is not None, r["image_id"] or 0))
    return pa.Table.from_pylist(ordered, schema=CONVERSATION_SCHEMA)


def drop_rows_of(table: pa.Table, image_ids: set[int]) -> tuple[pa.Table, int]:
    """`table` without the rows whose image_id is in `image_ids`; returns it and how many rows went."""
    if not image_ids or table.num_rows == 0:
        return table, 0
    gone = pc.fill_null(pc.is_in(table["image_id"], value_set=pa.array(sorted(image_ids), pa.int64())), False)
    kept = table.filter(pc.invert(gone))
    return kept, table.num_rows - kept.num_rows


# ---------------------------------------------------------------------------------------------------------------
# Decoding (Ray tasks) and encoding (Ray actors)
# ---------------------------------------------------------------------------------------------------------------


def load_image(path: str) -> tuple[Image.Image | None, str]:
    """Open and fully decode an image; returns (image, "") or (None, reason). Never raises for bad files."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing file"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    if not data:
        return None, "empty file"
    try:
        image = Image.open(BytesIO(data))
        image.load()
    except Image.DecompressionBombError as e:
        return None, f"too large: {e}"
    except UnidentifiedImageError:
        return None, "not an image (unrecognised format)"
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data; none may stop the run
        return None, f"corrupt or truncated image ({type(e).__name__}: {e})"
    return image, ""


def decode_images(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: image records -> pixel_values [B, 3, S, S] float32 (CLIP-normalised), width, height and
    error ("" when decoded; rows that failed keep zeros)."""
    from trimodal.models.vision import preprocess_images

    n = len(batch["image_id"])
    pixels = np.zeros((n, 3, image_size, image_size), np.float32)
    widths, heights = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = np.empty(n, dtype=object)
    good: list[int] = []
    images: list[Image.Image] = []
    for i, path in enumerate(batch["path"]):
        image, errors[i] = load_image(str(path))
        if image is not None:
            good.append(i)
            images.append(image)
            widths[i], heights[i] = image.size
    if images:
        pixels[good] = preprocess_images(images, image_size).numpy()
    out = {k: batch[k] for k in ("image_id", "file_name", "split", "path")}
    return {**out, "width": widths, "height": heights, "error": errors, "pixel_values": pixels}


class ClipEncoder:
    """Ray Data actor: loads the vision tower once, then turns pixel batches into float16 patch features."""

    def __init__(self, vision: VisionConfig, directory: str | None, use_gpu: bool):
        import torch

        from trimodal.models.vision import load_vision_tower

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tower = load_vision_tower(vision, directory=directory, device=self.device)
        self.shape = (self.tower.info.num_patches, self.tower.info.hidden_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = batch["error"] == ""
        embedding = np.zeros((len(ok), *self.shape), np.float16)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][ok])).to(self.device)
            embedding[ok] = self.tower(pixels).float().cpu().numpy().astype(np.float16)
        keep = ("image_id", "file_name", "split", "path", "width", "height", "error")
        return {**{k: batch[k] for k in keep}, "embedding": embedding}


# ---------------------------------------------------------------------------------------------------------------
# The Ray Data pipeline
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineOptions:
    """How the image pass runs."""

    batch_size: int = 32
    """Images per decode task and per CLIP forward pass."""
    encoders: int = 1
    """Size of the encoder actor pool."""
    gpus_per_encoder: float = 0.0
    """GPUs reserved per encoder actor (fractions share a GPU)."""
    cpus_per_encoder: float = 1.0
    """CPUs reserved per encoder actor; see `default_cpus_per_encoder`."""
    progress_every_s: float = 10.0
    """Seconds between progress lines."""

    def validate(self) -> "PipelineOptions":
        if self.batch_size < 1 or self.encoders < 1:
            raise PreprocessError(f"--batch-size and --encoders must be >= 1, got {self.batch_size}, {self.encoders}")
        if self.gpus_per_encoder < 0 or self.cpus_per_encoder <= 0:
            raise PreprocessError("--gpus-per-encoder must be >= 0 and CPUs per encoder > 0")
        return self


def default_cpus_per_encoder(cluster_cpus: float, encoders: int, gpus_per_encoder: float) -> float:
    """One CPU per encoder, but on a small CPU-only machine leave one CPU free for the decode tasks (a pool that
    reserved every CPU would starve them and the pipeline would stall)."""
    if gpus_per_encoder > 0 or cluster_cpus - encoders >= 1:
        return 1.0
    return max(0.25, (cluster_cpus - 1) / encoders)


def pin_vision(vision: VisionConfig, directory: str | Path | None) -> tuple[VisionConfig, str | None]:
    """The (config, directory) pair that loads the same tower on every worker, whatever its working directory:
    a relative `path` source becomes absolute, and a missing one with `fallback_to_random` becomes `random`."""
    if directory is not None:
        path = Path(directory).resolve()
        if not (path / "config.json").is_file():
            raise PreprocessError(f"--vision {directory}: not a CLIP model directory (no config.json)")
        return vision, str(path)
    if vision.source.kind != "path":
        return vision, None
    path = Path(vision.source.name).resolve()
    if path.exists() or not vision.fallback_to_random:
        return replace(vision, source=replace(vision.source, name=str(path))), None
    return replace(vision, source=ModelSource(kind="random", name=vision.source.name), fallback_to_random=False), None


def image_blocks(images: Sequence[ImageRecord], batch_size: int) -> "ray.data.Dataset":  # noqa: F821
    """A dataset of image records with one block per batch, so each decode task and each CLIP forward pass sees
    the same images on every run (float results depend on batch composition)."""
    import pandas as pd
    import ray.data

    rows = [asdict(image) for image in images]
    frames = [pd.DataFrame(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return ray.data.from_pandas(frames)


def decode_memory(batch_size: int, image_size: int) -> int:
    """Heap bytes a decode task reserves: the worker itself (torch is imported), and per image its float32
    pixels (twice, for the copy) and room for a decoded source image. Reserving it also keeps Ray Data from
    fusing the decode tasks into the encoder actors (it fuses a task map into an actor map only when their
    remote arguments match)."""
    return (512 << 20) + batch_size * (2 * 3 * image_size * image_size * 4 + (4 << 20))


def embedding_pipeline(images: Sequence[ImageRecord], vision: VisionConfig, directory: str | None,
                       image_size: int, opts: PipelineOptions) -> "ray.data.Dataset":  # noqa: F821
    """Decode in tasks, encode in a fixed actor pool; rows keep their order (image_id).

    Ray Data restarts a killed encoder actor and retries its batch (its actor pools default to max_restarts=-1,
    max_task_retries=-1), so no row is lost when an actor dies mid-run."""
    import ray.data

    decoded = image_blocks(images, opts.batch_size).map_batches(
        decode_images, batch_size=None, batch_format="numpy", fn_kwargs={"image_size": image_size},
        num_cpus=1, memory=decode_memory(opts.batch_size, image_size), udf_modifying_row_count=False)
    return decoded.map_batches(
        ClipEncoder, batch_size=None, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=opts.encoders),
        fn_constructor_kwargs={"vision": vision, "directory": directory, "use_gpu": opts.gpus_per_encoder > 0},
        num_cpus=opts.cpus_per_encoder, num_gpus=opts.gpus_per_encoder, udf_modifying_row_count=False)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def image_schema(num_patches: int, hidden_size: int) -> pa.Schema:
    """Schema of OUT/images: the embedding is Ray Data's fixed-shape tensor extension type, float16."""
    from ray.data.extensions import ArrowTensorTypeV2

    return pa.schema([("image_id", pa.int64()), ("embedding", ArrowTensorTypeV2((num_patches, hidden_size),
                                                                                pa.float16())),
                      ("width", pa.int32()), ("height", pa.int32()), ("file_name", pa.string()),
                      ("split", pa.string())])


class ParquetSink:
    """Writes tables, in arrival order, as DIR/part-00000.parquet, ... with row groups of `rows_per_group` rows
    and `groups_per_file` row groups per file. Same rows in, same bytes out."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_group: int, groups_per_file: int = 4):
        self.directory, self.schema = directory, schema
        self.rows_per_group, self.groups_per_file = max(1, rows_per_group), max(1, groups_per_file)
        self.pending: list[pa.Table] = []
        self.pending_rows = self.rows = self.groups = 0
        self.files = 0
        self.writer: pq.ParquetWriter | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        merged = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        group, rest = merged.slice(0, n), merged.slice(n)
        self.pending, self.pending_rows = [rest], rest.num_rows
        if self.writer is None or self.groups == self.groups_per_file:
            self._next_file()
        self.writer.write_table(group, row_group_size=max(n, 1))
        self.groups += 1
        self.rows += n

    def _next_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = pq.ParquetWriter(self.directory / f"part-{self.files:05d}.parquet", self.schema)
        self.files += 1
        self.groups = 0

    def close(self) -> int:
        """Flush and close; an empty table still gets one (empty) file so readers see the schema."""
        if self.pending_rows or self.writer is None:
            self._flush(self.pending_rows)
        self.writer.close()
        return self.rows


def rows_per_group(row_bytes: int, target: int = _TARGET_GROUP_BYTES) -> int:
    """Rows in a row group of about `target` bytes."""
    return max(1, target // max(1, row_bytes))


def write_table(table: pa.Table, directory: Path, rows_per_group: int = 200_000) -> int:
    """Write a table held in memory (captions, conversations) with the sink; returns the row count."""
    sink = ParquetSink(directory, table.schema, rows_per_group)
    sink.write(table)
    return sink.close()


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
                 opts: PipelineOptions, log: Log) -> ImagePass:
    """Run the pipeline and stream its rows into OUT/images; failed rows become the skipped list."""
    row_bytes = int(np.prod(schema.field("embedding").type.shape)) * 2 + 64
    sink = ParquetSink(directory, schema, rows_per_group(row_bytes), _TARGET_FILE_BYTES // _TARGET_GROUP_BYTES)
    result, progress, last_id = ImagePass(), Progress(total, opts.progress_every_s, log), -1
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


def encode_images(plan: Plan, vision: VisionConfig, directory: str | None, out: Path, opts: PipelineOptions,
                  info: Any, log: Log) -> ImagePass:
    """The image pass: Ray Data pipeline -> OUT/images (order preserved so re-runs give identical files)."""
    import ray.data

    schema = image_schema(info.num_patches, info.hidden_size)
    if not plan.images:
        ParquetSink(out / "images", schema, rows_per_group=1).close()
        return ImagePass()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds = embedding_pipeline(plan.images, vision, directory, info.image_size, opts)
        result = write_images(ds, out / "images", schema, len(plan.images), opts, log)
    finally:
        ctx.execution_options.preserve_order = saved
    if not result.in_order:
        log("warning: image rows arrived out of image_id order; the table is complete but not sorted")
    return result


def tower_info(vision: VisionConfig, directory: str | None) -> Any:
    """Load the tower once on the driver: fails fast on a bad directory and gives the manifest its shape."""
    from trimodal.models.vision import load_vision_tower

    return load_vision_tower(vision, directory=directory).info


# ---------------------------------------------------------------------------------------------------------------
# The run: plan -> OUT/.tmp-<id>/ -> swapped into OUT/
# ---------------------------------------------------------------------------------------------------------------


def run_preprocess(plan: Plan, vision: VisionConfig, out_dir: str | Path, opts: PipelineOptions,
                   vision_dir: str | Path | None = None, log: Log = _print) -> dict[str, Any]:
    """Encode the plan's images and write OUT (replacing its tables); returns the manifest."""
    start = time.perf_counter()
    opts = opts.validate()
    out = Path(out_dir).resolve()
    vision, directory = pin_vision(vision, vision_dir)
    info = tower_info(vision, directory)
    if info.untrained:
        log(f"note: the vision tower is UNTRAINED ({info.model_id}); run stage 0 (jobs/train_clip.py) for "
            "real features")
    tmp = scratch_dir(out)
    log(f"{len(plan.images)} unique images, {plan.captions.num_rows} captions, {plan.conversations.num_rows} "
        f"conversations; encoder {info.model_id} -> [{info.num_patches}, {info.hidden_size}] float16; "
        f"{opts.encoders} encoder(s) x {opts.cpus_per_encoder:g} CPU / {opts.gpus_per_encoder:g} GPU, "
        f"batch {opts.batch_size}")
    images = encode_images(plan, vision, directory, tmp, opts, info, log)
    skipped_ids = {s["image_id"] for s in images.skipped}
    captions, dropped_captions = drop_rows_of(plan.captions, skipped_ids)
    conversations, dropped_conversations = drop_rows_of(plan.conversations, skipped_ids)
    write_table(captions, tmp / "captions")
    write_table(conversations, tmp / "conversations")
    manifest = build_manifest(plan, info, opts, images, captions, conversations,
                              {"captions": dropped_captions, "conversations": dropped_conversations},
                              vision_dir, time.perf_counter() - start)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    publish(tmp, out)
    log(f"wrote {out}: {images.written} images, {captions.num_rows} captions, {conversations.num_rows} "
        f"conversations; {len(images.skipped)} images skipped ({dropped_captions} captions, "
        f"{dropped_conversations} conversations dropped); {manifest['throughput']['images_per_s']:.1f} images/s, "
        f"{manifest['throughput']['wall_seconds']:.1f} s")
    return manifest


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


def build_manifest(plan: Plan, info: Any, opts: PipelineOptions, images: ImagePass, captions: pa.Table,
                   conversations: pa.Table, dropped: dict[str, int], vision_dir: str | Path | None,
                   wall_s: float) -> dict[str, Any]:
    """The manifest.json document."""
    skipped_ids = {s["image_id"] for s in images.skipped}
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
        "options": asdict(opts),
        "pipeline": images.operators,
        "notes": plan.notes,
        "versions": versions(),
    }
