"""Readers for the two annotation formats the pipeline consumes (COCO captions, LLaVA-Instruct), with validation.

- COCO 2017 captions: `annotations/captions_{train,val}2017.json`, images in `train2017/`.
- LLaVA-Instruct-150K: a JSON list of {"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}.

Every problem raises `AnnotationError` with the file name and where in it the problem is, before any work
starts on bad data:

    images, captions = read_coco_captions("coco/annotations/captions_train2017.json")
    conversations = read_llava_instruct("llava_instruct_150k.json")
    by_name = index_by_file_name(images)
    image = resolve_llava_image(conversations[0].image, by_name)
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from trimodal.models.chat import IMAGE_MARKER, Turn

log = logging.getLogger(__name__)

ROLES: dict[str, str] = {"human": "user", "gpt": "assistant"}
_MARKER_RE = re.compile(r"\s*" + re.escape(IMAGE_MARKER) + r"\s*")


class AnnotationError(ValueError):
    """An annotation file is missing, malformed or inconsistent; the message names the file and the place."""


@dataclass(frozen=True)
class CocoImage:
    """One entry of a COCO file's "images" list (the fields we use)."""

    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class Caption:
    """One entry of a COCO captions file's "annotations" list."""

    image_id: int
    caption: str
    id: int


@dataclass(frozen=True)
class Conversation:
    """One LLaVA-Instruct entry; `image` is None for a text-only conversation. Its turns are "user" and
    "assistant" messages with the image markers removed from their text."""

    id: str
    image: str | None
    turns: list[Turn]


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(path: Path, where: str, entry: Any, key: str, kind: str) -> Any:
    """entry[key], checked to be a positive int ("id", "size") or a non-empty string ("str")."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise AnnotationError(f"{path}: {where}: missing {key!r}")
    value = entry[key]
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise AnnotationError(f"{path}: {where}: {key!r} must be a non-empty string, got {value!r}")
    elif not _is_int(value) or value < (0 if kind == "id" else 1):
        raise AnnotationError(f"{path}: {where}: {key!r} must be a {'non-negative' if kind == 'id' else 'positive'} "
                              f"integer, got {value!r}")
    return value


def read_coco_captions(
    path: str | Path, stats: dict[str, int] | None = None
) -> tuple[dict[int, CocoImage], list[Caption]]:
    """Read a COCO captions file into ({image id: CocoImage}, [Caption]).

    Tolerates what real COCO 2017 files contain (info, licenses, extra keys per entry). An image listed twice
    with identical fields is kept once and counted (logged, and in `stats["duplicate_images"]` when a dict is
    given); a conflicting duplicate, a file name shared by two ids, or a caption of an unknown image raises.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with 'images' and 'annotations', "
                              f"got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: {key!r} must be a list, got {type(data.get(key)).__name__}")
    images, duplicates = _coco_images(path, data["images"])
    captions, duplicate_captions = _coco_annotations(path, data["annotations"], images)
    if duplicates or duplicate_captions:
        log.warning("%s: dropped %d duplicate image entries and %d duplicate caption entries (identical)",
                    path, duplicates, duplicate_captions)
    if stats is not None:
        stats.update(images=len(images), captions=len(captions), duplicate_images=duplicates,
                     duplicate_captions=duplicate_captions)
    return images, captions


def _coco_images(path: Path, entries: list[Any]) -> tuple[dict[int, CocoImage], int]:
    """Validate the "images" list; returns the images by id and the number of identical duplicates dropped."""
    images: dict[int, CocoImage] = {}
    by_name: dict[str, int] = {}
    duplicates = 0
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        image = CocoImage(
            id=_field(path, where, entry, "id", "id"),
            file_name=_field(path, where, entry, "file_name", "str"),
            width=_field(path, where, entry, "width", "size"),
            height=_field(path, where, entry, "height", "size"),
        )
        if image.id in images:
            if images[image.id] != image:
                raise AnnotationError(f"{path}: {where}: image id {image.id} is listed twice with different fields: "
                                      f"{images[image.id]} vs {image}")
            duplicates += 1
            continue
        if image.file_name in by_name:
            raise AnnotationError(f"{path}: {where}: file name {image.file_name!r} is used by image ids "
                                  f"{by_name[image.file_name]} and {image.id}")
        images[image.id] = image
        by_name[image.file_name] = image.id
    return images, duplicates


def _coco_annotations(path: Path, entries: list[Any], images: dict[int, CocoImage]) -> tuple[list[Caption], int]:
    """Validate the "annotations" list; returns the captions and the number of identical duplicates dropped."""
    captions: dict[int, Caption] = {}
    duplicates = 0
    for i, entry in enumerate(entries):
        where = f"annotations[{i}]"
        caption = Caption(
            image_id=_field(path, where, entry, "image_id", "id"),
            caption=_field(path, where, entry, "caption", "str").strip(),
            id=_field(path, where, entry, "id", "id"),
        )
        if caption.image_id not in images:
            raise AnnotationError(
                f"{path}: {where}: caption {caption.id} refers to unknown image id {caption.image_id}")
        if caption.id in captions:
            if captions[caption.id] != caption:
                raise AnnotationError(f"{path}: {where}: annotation id {caption.id} is listed twice with different "
                                      "fields")
            duplicates += 1
            continue
        captions[caption.id] = caption
    return list(captions.values()), duplicates


def read_llava_instruct(path: str | Path) -> list[Conversation]:
    """Read a LLaVA-Instruct JSON list into Conversations, in file order.

    Roles map human -> user, gpt -> assistant; turns must start with human, alternate, and end with gpt.
    `<image>` markers (with the newline around them) are removed from the text. Entries without "image" are
    text-only conversations (image None); those must not contain a marker. Duplicate ids are allowed (the real
    file has several conversations per image).
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    return [_llava_entry(path, i, entry) for i, entry in enumerate(data)]


def _llava_entry(path: Path, index: int, entry: Any) -> Conversation:
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
    raw_id = entry.get("id")
    if not (isinstance(raw_id, str) and raw_id) and not _is_int(raw_id):
        raise AnnotationError(f"{path}: {where}: 'id' must be a non-empty string or an integer, got {raw_id!r}")
    where = f"entry {index} (id {raw_id!r})"
    image = entry.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise AnnotationError(f"{path}: {where}: 'image' must be a non-empty string, got {image!r}")
    messages = entry.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise AnnotationError(f"{path}: {where}: 'conversations' must be a non-empty list")
    turns = [_llava_turn(path, where, j, m, image is not None) for j, m in enumerate(messages)]
    if turns[-1].role != "assistant":
        raise AnnotationError(f"{path}: {where}: the last turn is from 'human'; a conversation must end with 'gpt'")
    return Conversation(id=str(raw_id), image=image, turns=turns)


def _llava_turn(path: Path, where: str, j: int, message: Any, has_image: bool) -> Turn:
    where = f"{where} turn {j}"
    if not isinstance(message, dict):
        raise AnnotationError(f"{path}: {where}: expected an object, got {type(message).__name__}")
    source = message.get("from")
    if source not in ROLES:
        raise AnnotationError(f"{path}: {where}: 'from' must be one of {sorted(ROLES)}, got {source!r}")
    expected = "human" if j % 2 == 0 else "gpt"
    if source != expected:
        raise AnnotationError(f"{path}: {where}: expected a {expected!r} turn (turns start with human and "
                              f"alternate), got {source!r}")
    value = message.get("value")
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{path}: {where}: 'value' must be a non-empty string, got {value!r}")
    if IMAGE_MARKER in value and not has_image:
        raise AnnotationError(f"{path}: {where}: {IMAGE_MARKER} marker in a conversation without 'image'")
    text = strip_image_markers(value)
    if not text and source == "gpt":
        raise AnnotationError(f"{path}: {where}: 'value' is empty once {IMAGE_MARKER} markers are removed")
    return Turn(role=ROLES[source], text=text)


def strip_image_markers(text: str) -> str:
    """Remove `<image>` markers and the whitespace around them: '<image>\\nWhat?' -> 'What?'; a marker inside
    the text becomes a newline. Text without a marker is returned unchanged; a user turn that held only the
    marker becomes empty (the image alone is the question)."""
    if IMAGE_MARKER not in text:
        return text
    return "\n".join(piece for piece in _MARKER_RE.split(text) if piece).strip()


def index_by_file_name(images: dict[int, CocoImage]) -> dict[str, CocoImage]:
    """{file name: CocoImage} for resolving LLaVA "image" fields."""
    return {image.file_name: image for image in images.values()}


def resolve_llava_image(name: str, by_file_name: dict[str, CocoImage]) -> CocoImage | None:
    """The COCO image a LLaVA "image" field names ("000000033471.jpg", or a path such as
    "coco/train2017/000000033471.jpg": matched by its last component); None when no image has that name."""
    return by_file_name.get(PurePosixPath(name.replace("\\", "/")).name)
