"""COCO captions and LLaVA-Instruct readers: real-file quirks are tolerated, malformed files fail naming the file."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from trimodal.data.formats import (
    AnnotationError,
    Caption,
    CocoImage,
    Conversation,
    Turn,
    index_by_file_name,
    read_coco_captions,
    read_llava_instruct,
    resolve_llava_image,
    strip_image_markers,
)

# Shaped like the head of the real captions_train2017.json (extra keys, info, licenses); image 391895 is
# listed twice, identically.
_IMAGE_391895 = {
    "license": 3, "file_name": "000000391895.jpg",
    "coco_url": "http://images.cocodataset.org/train2017/000000391895.jpg", "height": 360, "width": 640,
    "date_captured": "2013-11-14 11:18:45",
    "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg", "id": 391895,
}
COCO: dict[str, Any] = {
    "info": {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2017,
             "contributor": "COCO Consortium", "date_created": "2017/09/01"},
    "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                  "name": "Attribution-NonCommercial-ShareAlike License"}],
    "images": [
        _IMAGE_391895,
        {"license": 4, "file_name": "000000522418.jpg",
         "coco_url": "http://images.cocodataset.org/train2017/000000522418.jpg", "height": 480, "width": 640,
         "date_captured": "2013-11-14 11:38:44",
         "flickr_url": "http://farm1.staticflickr.com/1/127244861_ab0c0381e7_z.jpg", "id": 522418},
        dict(_IMAGE_391895),
    ],
    "annotations": [
        {"image_id": 391895, "id": 770337,
         "caption": "A man with a red helmet on a small moped on a dirt road. "},
        {"image_id": 522418, "id": 775191,
         "caption": "A woman wearing a net on her head cutting a cake. "},
        {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike on a dirt road on the countryside."},
    ],
}

LLAVA: list[dict[str, Any]] = [
    {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ]},
    {"id": "000000052846", "image": "coco/train2017/000000052846.jpg", "conversations": [
        {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
        {"from": "gpt", "value": "The cat is sitting on top of a car."},
    ]},
    {"id": 7, "conversations": [
        {"from": "human", "value": "Say hi."},
        {"from": "gpt", "value": "Hi!"},
    ]},
]


def _write(tmp_path: Path, data: Any, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_real_coco_file_parses_and_deduplicates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        images, captions = read_coco_captions(_write(tmp_path, COCO), stats=stats)
    assert images == {
        391895: CocoImage(391895, "000000391895.jpg", 640, 360),
        522418: CocoImage(522418, "000000522418.jpg", 640, 480),
    }
    assert captions[0] == Caption(391895, "A man with a red helmet on a small moped on a dirt road.", 770337)
    assert [c.image_id for c in captions] == [391895, 522418, 391895]
    assert stats == {"images": 2, "captions": 3, "duplicate_images": 1, "duplicate_captions": 0}
    assert "1 duplicate image" in caplog.text


def _coco_with(change: Any) -> dict[str, Any]:
    data = copy.deepcopy(COCO)
    change(data)
    return data


@pytest.mark.parametrize("data, problem", [
    (_coco_with(lambda d: d["images"][2].update(file_name="other.jpg")), "image id 391895 is listed twice"),
    (_coco_with(lambda d: d["annotations"].append({"image_id": 42, "id": 1, "caption": "x"})), "unknown image id 42"),
    (_coco_with(lambda d: d["images"][1].update(file_name="000000391895.jpg")), "used by image ids 391895 and 522418"),
    (_coco_with(lambda d: d["images"][0].pop("width")), "images[0]: missing 'width'"),
    (_coco_with(lambda d: d["images"][1].update(id="522418")), "images[1]: 'id' must be"),
    (_coco_with(lambda d: d["images"][1].update(id=True)), "images[1]: 'id' must be"),
    (_coco_with(lambda d: d["annotations"][1].update(caption="  ")), "annotations[1]: 'caption'"),
    (_coco_with(lambda d: d["annotations"].append({"image_id": 391895, "id": 770337, "caption": "new"})),
     "annotation id 770337 is listed twice"),
    (_coco_with(lambda d: d.pop("annotations")), "'annotations' must be a list"),
    ([1, 2], "expected a JSON object"),
    ('{"images": [', "invalid JSON at line 1"),
])
def test_bad_coco_files_name_file_and_problem(tmp_path: Path, data: Any, problem: str) -> None:
    path = _write(tmp_path, data, "captions_train2017.json")
    with pytest.raises(AnnotationError) as info:
        read_coco_captions(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_missing_file_is_an_annotation_error(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="nope.json: cannot read"):
        read_coco_captions(tmp_path / "nope.json")
    with pytest.raises(AnnotationError, match="nope.json: cannot read"):
        read_llava_instruct(tmp_path / "nope.json")


def test_llava_markers_removed_and_history_kept(tmp_path: Path) -> None:
    conversations = read_llava_instruct(_write(tmp_path, LLAVA))
    assert conversations[0] == Conversation("000000033471", "000000033471.jpg", [
        Turn("user", "What are the colors of the bus in the image?"),
        Turn("assistant", "The bus in the image is white and red."),
        Turn("user", "What feature can be seen on the back of the bus?"),
        Turn("assistant", "The back of the bus features an advertisement."),
    ])
    assert conversations[1].turns[0] == Turn("user", "Where is the cat positioned in the image?")
    assert conversations[2] == Conversation("7", None, [Turn("user", "Say hi."), Turn("assistant", "Hi!")])
    assert all("<image>" not in t.text for c in conversations for t in c.turns)


def test_strip_image_markers() -> None:
    assert strip_image_markers("<image>\nWhat is it?") == "What is it?"
    assert strip_image_markers("What is it?\n<image>") == "What is it?"
    assert strip_image_markers("Look:\n<image>\nWhat is it?") == "Look:\nWhat is it?"
    assert strip_image_markers("<image>") == ""
    assert strip_image_markers("  keep  spacing\n") == "  keep  spacing\n"


def _llava_with(index: int, change: Any) -> list[dict[str, Any]]:
    data = copy.deepcopy(LLAVA)
    change(data[index])
    return data


@pytest.mark.parametrize("data, problem", [
    ({"id": 1}, "expected a JSON list"),
    ('[{"id": "1",', "invalid JSON"),
    (_llava_with(1, lambda e: e["conversations"].reverse()), "entry 1 (id '000000052846') turn 0: expected a 'human'"),
    (_llava_with(0, lambda e: e["conversations"].__setitem__(1, {"from": "human", "value": "x"})),
     "entry 0 (id '000000033471') turn 1: expected a 'gpt'"),
    (_llava_with(0, lambda e: e["conversations"][3].update(value="")), "turn 3: 'value' must be a non-empty string"),
    (_llava_with(0, lambda e: e["conversations"][2].update({"from": "system"})), "turn 2: 'from' must be one of"),
    (_llava_with(0, lambda e: e["conversations"].pop()), "entry 0 (id '000000033471'): the last turn is from 'human'"),
    (_llava_with(2, lambda e: e["conversations"][0].update(value="<image>\nhi")),
     "entry 2 (id 7) turn 0: <image> marker"),
    (_llava_with(1, lambda e: e.update(conversations=[])), "entry 1 (id '000000052846'): 'conversations' must be"),
    (_llava_with(1, lambda e: e.update(image="")), "entry 1 (id '000000052846'): 'image' must be"),
    (_llava_with(1, lambda e: e.pop("id")), "entry 1: 'id' must be"),
    ([*LLAVA, "oops"], "entry 3: expected an object"),
])
def test_bad_llava_files_name_file_and_entry(tmp_path: Path, data: Any, problem: str) -> None:
    path = _write(tmp_path, data, "llava_instruct_150k.json")
    with pytest.raises(AnnotationError) as info:
        read_llava_instruct(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_resolve_llava_image_by_file_name(tmp_path: Path) -> None:
    images, _ = read_coco_captions(_write(tmp_path, COCO))
    by_name = index_by_file_name(images)
    assert resolve_llava_image("000000391895.jpg", by_name) == images[391895]
    assert resolve_llava_image("coco/train2017/000000522418.jpg", by_name) == images[522418]
    assert resolve_llava_image("000000000001.jpg", by_name) is None
