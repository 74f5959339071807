"""The plan: which images to encode and which rows to write (pure Python + Arrow, no Ray).

    plan = build_plan(["data/coco"], ["data/llava_instruct_150k.json"], limit=None)

Reads and validates COCO captions files and LLaVA-Instruct files, resolves each conversation's image to a COCO
image id, removes duplicates, applies `--limit`, and holds the captions and conversations tables in memory.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trimodal.data.formats import CocoImage, Conversation, read_coco_captions, read_llava_instruct, resolve_llava_image

_CAPTIONS_FILE = re.compile(r"^captions_(train|val)(\d{4})\.json$")

Log = Callable[[str], None]
"""Where preprocessing's progress lines and warnings go."""


class PreprocessError(ValueError):
    """The inputs cannot be preprocessed as given (no annotation files, clashing image ids, ...)."""


def print_log(message: str) -> None:
    """The default `Log`: one "[preprocess] ..." line on stdout."""
    print(f"[preprocess] {message}", flush=True)


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


def load_coco(roots: Sequence[str | Path], log: Log = print_log) -> _Catalog:
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
               limit: int | None = None, log: Log = print_log) -> Plan:
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
