"""The set on disk, in the COCO-captions and LLaVA-Instruct formats so the same code reads it as the real data,
plus a ground-truth file for evaluation:

    DIR/train2017/000000000001.png ...             training images, COCO ids 1 .. n_train
    DIR/val2017/000001000001.png ...               held-out images, COCO ids VAL_ID_OFFSET + 1 ..
    DIR/annotations/captions_{train,val}2017.json  COCO captions, 3 per image (the first is the canonical one)
    DIR/llava_instruct.json                        LLaVA-Instruct conversations about the training images
    DIR/llava_instruct_val.json                    the same for the held-out images
    DIR/shapes_meta.json                           objects (colour, shape, bbox) and, per question, type, expected
                                                   answer and phrasing set

Re-running into the same directory rewrites nothing that is already identical, and yields byte-identical files.

    summary = write_shapes_dataset("runs/demo/shapes", n_train=2000, n_val=400, seed=0)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trimodal.data.shapes.drawing import IMAGE_SIZE, ShapeObject, encode_png, render
from trimodal.data.shapes.questions import Question
from trimodal.data.shapes.samples import VAL_ID_OFFSET, ShapeSample, sample_image
from trimodal.data.shapes.vocabulary import COLORS, PHRASINGS, QUESTION_TYPES, SHAPES
from trimodal.files import is_scratch, write_bytes_atomic

SPLIT_DIRS: dict[str, str] = {"train": "train2017", "val": "val2017"}
CAPTION_FILES: dict[str, str] = {"train": "captions_train2017.json", "val": "captions_val2017.json"}
LLAVA_FILES: dict[str, str] = {"train": "llava_instruct.json", "val": "llava_instruct_val.json"}
META_FILE = "shapes_meta.json"
META_VERSION = 2
"""Version 2 records each question's phrasing set; a version-1 file asked seen wordings only."""
_IMAGE_NAME = re.compile(r"^\d{12}\.png$")


@dataclass(frozen=True)
class QuestionTruth:
    """Ground truth of one question: the human message is conversations[2 * turn] of conversation_id."""

    conversation_id: str
    """The LLaVA conversation that asks it (`conversation_id`)."""
    turn: int
    """0-based turn within that conversation."""
    question: Question
    """The question, its reference answer, expected keyword and phrasing set."""


@dataclass(frozen=True)
class ImageTruth:
    """Ground truth of one image, as stored in shapes_meta.json."""

    image_id: int
    """COCO image id."""
    file_name: str
    """The PNG's name inside its split's directory."""
    split: str
    """train or val."""
    objects: tuple[ShapeObject, ...]
    """The drawn shapes, left to right."""
    questions: tuple[QuestionTruth, ...]
    """Every question asked about the image, in conversation and turn order."""


@dataclass(frozen=True)
class ShapesSummary:
    """What `write_shapes_dataset` wrote."""

    out_dir: Path
    """The set's directory."""
    seed: int
    """The seed every image was drawn from."""
    n_train: int
    """Training images."""
    n_val: int
    """Held-out images."""
    n_captions: int
    """Captions over both splits."""
    n_conversations: int
    """Conversations over both splits."""
    n_questions: int
    """Questions over both splits."""
    images_written: int
    """PNG files created or changed (identical files are left alone)."""
    images_removed: int
    """Stale PNG or temporary files removed from a previous, larger run."""
    files: tuple[Path, ...]
    """The annotation files."""
    seconds: float
    """Wall time of the whole write."""


def conversation_id(image_id: int, k: int) -> str:
    """LLaVA-style id of the k-th conversation about an image: '000000000042_0'."""
    return f"{image_id:012d}_{k}"


def llava_records(samples: Iterable[ShapeSample]) -> list[dict[str, Any]]:
    """Conversations in the LLaVA-Instruct-150K JSON format; `<image>\\n` opens the first human turn."""
    records = []
    for s in samples:
        for k, questions in enumerate(s.conversations):
            turns: list[dict[str, str]] = []
            for t, q in enumerate(questions):
                prompt = f"<image>\n{q.question}" if t == 0 else q.question
                turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": q.answer}]
            records.append({"id": conversation_id(s.image_id, k), "image": s.file_name, "conversations": turns})
    return records


def coco_captions(samples: Sequence[ShapeSample], split: str) -> dict[str, Any]:
    """The COCO captions file of one split; annotation ids are image_id * 10 + k."""
    return {
        "info": {
            "description": f"trimodal synthetic shapes ({split})",
            "version": "1.0",
            "contributor": "trimodal",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": [
            {"license": 1, "id": s.image_id, "file_name": s.file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE}
            for s in samples
        ],
        "annotations": [
            {"id": s.image_id * 10 + k, "image_id": s.image_id, "caption": c}
            for s in samples
            for k, c in enumerate(s.captions)
        ],
    }


def meta_record(seed: int, samples: Iterable[ShapeSample]) -> dict[str, Any]:
    """The ground-truth file: per image its objects, per question its type, expected answer and phrasing set."""
    images = []
    for s in samples:
        objects = [
            {"color": o.color, "shape": o.shape, "bbox": o.bbox(), "center": [o.cx, o.cy], "radius": o.radius}
            for o in s.objects
        ]
        questions = [
            {"conversation_id": conversation_id(s.image_id, k), "turn": t, **asdict(q)}
            for k, conv in enumerate(s.conversations)
            for t, q in enumerate(conv)
        ]
        images.append({"image_id": s.image_id, "file_name": s.file_name, "split": s.split,
                       "width": IMAGE_SIZE, "height": IMAGE_SIZE, "background": list(s.background),
                       "objects": objects, "questions": questions})
    return {"version": META_VERSION, "seed": seed, "bbox_format": "xywh",
            "colors": {k: list(v) for k, v in COLORS.items()},
            "shapes": list(SHAPES), "question_types": list(QUESTION_TYPES),
            "phrasings": {t: {k: list(v) for k, v in sets.items()} for t, sets in PHRASINGS.items()},
            "images": images}


def read_shapes_meta(path: str | Path) -> list[ImageTruth]:
    """Load shapes_meta.json back into typed records."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for img in data["images"]:
        objects = tuple(
            ShapeObject(o["color"], o["shape"], o["center"][0], o["center"][1], o["radius"]) for o in img["objects"]
        )
        questions = tuple(
            QuestionTruth(q["conversation_id"], q["turn"],
                          Question(q["type"], q["question"], q["answer"], q["expected"], q.get("phrasing", "seen")))
            for q in img["questions"]
        )
        out.append(ImageTruth(img["image_id"], img["file_name"], img["split"], objects, questions))
    return out


def write_shapes_dataset(out_dir: str | Path, n_train: int, n_val: int, seed: int = 0) -> ShapesSummary:
    """Generate the set into `out_dir` (layout in the module docstring); returns what was written."""
    start = time.perf_counter()
    _check_sizes(n_train, n_val, seed)
    out = Path(out_dir)
    samples = {split: [sample_image(seed, split, i) for i in range(n)]
               for split, n in (("train", n_train), ("val", n_val))}
    written = removed = 0
    for split, items in samples.items():
        w, r = _write_images(out / SPLIT_DIRS[split], items)
        written, removed = written + w, removed + r
    documents: dict[Path, Any] = {out / META_FILE: meta_record(seed, samples["train"] + samples["val"])}
    for split, items in samples.items():
        documents[out / "annotations" / CAPTION_FILES[split]] = coco_captions(items, split)
        documents[out / LLAVA_FILES[split]] = llava_records(items)
    for path, document in documents.items():
        write_bytes_atomic(path, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    everything = samples["train"] + samples["val"]
    return ShapesSummary(
        out_dir=out, seed=seed, n_train=n_train, n_val=n_val,
        n_captions=sum(len(s.captions) for s in everything),
        n_conversations=sum(len(s.conversations) for s in everything),
        n_questions=sum(len(c) for s in everything for c in s.conversations),
        images_written=written, images_removed=removed,
        files=tuple(documents), seconds=time.perf_counter() - start,
    )


def _write_images(directory: Path, samples: list[ShapeSample]) -> tuple[int, int]:
    """Write the PNGs of one split; remove stale ones from an earlier run. Returns (written, removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = sum(write_bytes_atomic(directory / s.file_name, encode_png(render(s.background, s.objects)))
                  for s in samples)
    keep = {s.file_name for s in samples}
    removed = 0
    for path in directory.iterdir():
        stale = _IMAGE_NAME.match(path.name) and path.name not in keep
        if (stale or is_scratch(path)) and path.is_file():
            path.unlink()
            removed += 1
    return written, removed


def _check_sizes(n_train: int, n_val: int, seed: int) -> None:
    for name, value in (("n_train", n_train), ("n_val", n_val), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if n_train >= VAL_ID_OFFSET:
        raise ValueError(f"n_train must be < {VAL_ID_OFFSET} so train and val image ids stay apart")
