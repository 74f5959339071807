"""The shapes set on disk: determinism, stale files, the COCO / LLaVA layout, questions consistent with the meta
file, held-out wordings kept out of training, the meta file read back, and the make_shapes job."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from trimodal.data.formats import (
    index_by_file_name,
    read_coco_captions,
    read_llava_instruct,
    resolve_llava_image,
)
from trimodal.data.shapes.dataset import read_shapes_meta, write_shapes_dataset
from trimodal.data.shapes.drawing import IMAGE_SIZE
from trimodal.data.shapes.questions import SIDE_MIN_DX
from trimodal.data.shapes.samples import VAL_ID_OFFSET, sample_image
from trimodal.data.shapes.vocabulary import COLORS, PHRASINGS, SHAPES
from trimodal.evaluation.scoring import answer_correct, described_objects, phrasing_of, tokens

N_TRAIN, N_VAL = 24, 8


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, N_TRAIN, N_VAL, seed=0)
    return out


def test_same_seed_same_bytes(dataset: Path, tmp_path: Path) -> None:
    summary = write_shapes_dataset(tmp_path / "again", N_TRAIN, N_VAL, seed=0)
    assert summary.images_written == N_TRAIN + N_VAL
    assert _hashes(tmp_path / "again") == _hashes(dataset)
    before = _hashes(tmp_path / "again")
    rerun = write_shapes_dataset(tmp_path / "again", N_TRAIN, N_VAL, seed=0)
    assert rerun.images_written == 0 and rerun.images_removed == 0
    assert _hashes(tmp_path / "again") == before


def test_different_seed_different_images(dataset: Path, tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path, N_TRAIN, N_VAL, seed=1)
    ours, theirs = _hashes(dataset), _hashes(tmp_path)
    assert ours.keys() == theirs.keys()
    differing = [k for k in ours if k.endswith(".png") and ours[k] != theirs[k]]
    assert len(differing) == N_TRAIN + N_VAL


def test_image_k_does_not_depend_on_n(dataset: Path, tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path, 5, 2, seed=0)
    small, big = _hashes(tmp_path), _hashes(dataset)
    for name in small:
        if name.endswith(".png"):
            assert small[name] == big[name], name


def test_rerun_with_fewer_images_removes_stale_files(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path, 6, 3, seed=0)
    summary = write_shapes_dataset(tmp_path, 4, 1, seed=0)
    assert summary.images_removed == 4
    assert len(list((tmp_path / "train2017").iterdir())) == 4
    assert len(list((tmp_path / "val2017").iterdir())) == 1


def test_rerun_removes_scratch_files_left_by_an_interrupted_run(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path, 2, 1, seed=0)
    (tmp_path / "train2017" / ".000000000001.png.tmp-4242.png").write_bytes(b"half a png")
    summary = write_shapes_dataset(tmp_path, 2, 1, seed=0)
    assert summary.images_written == 0 and summary.images_removed == 1
    assert sorted(p.name for p in (tmp_path / "train2017").iterdir()) == ["000000000001.png", "000000000002.png"]


def test_layout_and_counts(dataset: Path) -> None:
    for split, n, first_id in (("train", N_TRAIN, 1), ("val", N_VAL, VAL_ID_OFFSET + 1)):
        pngs = sorted((dataset / f"{split}2017").iterdir())
        assert len(pngs) == n
        assert all(re.fullmatch(r"\d{12}\.png", p.name) for p in pngs)
        with Image.open(pngs[0]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))
        images, captions = read_coco_captions(dataset / "annotations" / f"captions_{split}2017.json")
        assert sorted(images) == list(range(first_id, first_id + n))
        assert {im.file_name for im in images.values()} == {p.name for p in pngs}
        per_image = Counter(c.image_id for c in captions)
        assert set(per_image.values()) <= {3, 4}  # 4: two shapes side by side (positional caption)
        llava = dataset / ("llava_instruct.json" if split == "train" else "llava_instruct_val.json")
        by_name = index_by_file_name(images)
        conversations = read_llava_instruct(llava)
        assert all(resolve_llava_image(c.image, by_name) is not None for c in conversations)
        assert {c.image for c in conversations} == {p.name for p in pngs}
        assert len({c.id for c in conversations}) == len(conversations)
    assert sorted(p.name for p in dataset.iterdir()) == [
        "annotations", "llava_instruct.json", "llava_instruct_val.json", "shapes_meta.json", "train2017", "val2017"]


def _applicable_types(objects: list[dict]) -> Counter:
    shapes, colors = Counter(o["shape"] for o in objects), Counter(o["color"] for o in objects)
    apart_in_x = len(objects) == 2 and abs(objects[0]["center"][0] - objects[1]["center"][0]) >= SIDE_MIN_DX
    return +Counter(
        {"color": sum(shapes[o["shape"]] == 1 for o in objects),
         "shape": sum(colors[o["color"]] == 1 for o in objects), "count": 1, "describe": 1, "exists": 1,
         "side": int(apart_in_x)})


def test_questions_match_meta_and_conversations(dataset: Path) -> None:
    meta = json.loads((dataset / "shapes_meta.json").read_text())
    conversations = {c.id: c for name in ("llava_instruct.json", "llava_instruct_val.json")
                     for c in read_llava_instruct(dataset / name)}
    raw = {e["id"]: e for e in json.loads((dataset / "llava_instruct.json").read_text())}
    for entry in raw.values():
        values = [m["value"] for m in entry["conversations"]]
        assert values[0].startswith("<image>\n") and not any("<image>" in v for v in values[1:])
        assert 2 <= len(values) // 2 <= 4
    assert len(meta["images"]) == N_TRAIN + N_VAL
    assert meta["phrasings"] == {t: {k: list(v) for k, v in sets.items()} for t, sets in PHRASINGS.items()}
    for image in meta["images"]:
        objects = image["objects"]
        questions = image["questions"]
        assert +Counter(q["type"] for q in questions) == _applicable_types(objects)
        assert len({q["conversation_id"] for q in questions}) in (1, 2)
        for q in questions:
            turns = conversations[q["conversation_id"]].turns
            assert turns[2 * q["turn"]].text == q["question"]
            assert turns[2 * q["turn"] + 1].text == q["answer"]
            assert phrasing_of(q["question"]) == (q["type"], q["phrasing"])  # the phrasing set is recorded
            assert answer_correct(q["type"], q["answer"], q["expected"]) is True  # names it, and no other
            _check_truth(q, objects)


def _check_truth(q: dict, objects: list[dict]) -> None:
    """The expected answer is right for the drawn objects, whatever the question's wording."""
    words = tokens(q["question"])
    if q["type"] == "color":
        named = [s for s in SHAPES if s in words]
        asked = [o for o in objects if o["shape"] in named] if named else objects
        assert [o["color"] for o in asked] == [q["expected"]]
    elif q["type"] == "shape":
        named = [c for c in COLORS if c in words]  # none in "What shape is it?" (one-shape images only)
        asked = [o for o in objects if o["color"] in named] if named else objects
        assert [o["shape"] for o in asked] == [q["expected"]]
    elif q["type"] == "count":
        assert q["expected"] == {1: "one", 2: "two"}[len(objects)]
    elif q["type"] == "describe":
        assert described_objects(q["answer"]) == Counter((o["color"], o["shape"]) for o in objects)
    elif q["type"] == "exists":
        color, shape = next(c for c in COLORS if c in words), next(s for s in SHAPES if s in words)
        drawn = {(o["color"], o["shape"]) for o in objects}
        assert q["expected"] == ("yes" if (color, shape) in drawn else "no")
        assert color in {c for c, _ in drawn} or shape in {s for _, s in drawn}  # a "no" is plausible
    else:
        _check_side(q, objects)


def _check_side(q: dict, objects: list[dict]) -> None:
    left, right = sorted(objects, key=lambda o: o["center"][0])
    assert right["center"][0] - left["center"][0] >= SIDE_MIN_DX
    side = "left" if "left" in q["question"] or "leftmost" in q["question"] else "right"
    assert q["expected"] == (left if side == "left" else right)["color"]


def test_held_out_wordings_never_appear_in_training_and_val_asks_both(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path, 150, 60, seed=3)
    seen = {"train": Counter(), "val": Counter()}
    for split, name in (("train", "llava_instruct.json"), ("val", "llava_instruct_val.json")):
        for conv in read_llava_instruct(tmp_path / name):
            for turn in conv.turns[::2]:
                qtype, phrasing_set = phrasing_of(turn.text)
                seen[split][qtype, phrasing_set] += 1
    assert {phrasing_set for _, phrasing_set in seen["train"]} == {"seen"}
    for qtype in PHRASINGS:
        assert seen["train"][qtype, "seen"] > 0
        assert seen["val"][qtype, "seen"] > 0 and seen["val"][qtype, "held_out"] > 0, qtype
    train_questions = {q.question.question for t in read_shapes_meta(tmp_path / "shapes_meta.json")
                       if t.split == "train" for q in t.questions}
    assert all(phrasing_of(q)[1] == "seen" for q in train_questions)


def test_read_shapes_meta_round_trips(dataset: Path) -> None:
    truths = read_shapes_meta(dataset / "shapes_meta.json")
    assert [t.split for t in truths] == ["train"] * N_TRAIN + ["val"] * N_VAL
    sample = sample_image(0, "val", 2)
    truth = next(t for t in truths if t.image_id == sample.image_id)
    assert truth.objects == sample.objects
    assert [q.question for q in truth.questions] == [q for c in sample.conversations for q in c]
    assert [q.question.question for q in truth.questions] == [q.question for c in sample.conversations for q in c]
    assert [q.question.phrasing for q in truth.questions] == [q.phrasing for c in sample.conversations for q in c]
    assert [(q.conversation_id, q.turn) for q in truth.questions] == [
        (f"{sample.image_id:012d}_{k}", t) for k, c in enumerate(sample.conversations) for t in range(len(c))]


@pytest.mark.parametrize("kwargs", [{"n_train": -1, "n_val": 1}, {"n_train": 1, "n_val": 1, "seed": -3},
                                    {"n_train": VAL_ID_OFFSET, "n_val": 1}, {"n_train": 1.5, "n_val": 1}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_shapes_dataset(tmp_path, **kwargs)


def test_make_shapes_job_takes_its_sizes_from_the_preset_and_flags_override(load_job, tmp_path: Path,
                                                                             capsys) -> None:
    job = load_job("make_shapes")
    job.main(["--preset", "test", "--out", str(tmp_path / "preset")])  # test preset: 16 train, 8 val, seed 0
    assert "16 train + 8 val images (seed 0)" in capsys.readouterr().out
    assert len(list((tmp_path / "preset" / "train2017").glob("*.png"))) == 16
    assert len(list((tmp_path / "preset" / "val2017").glob("*.png"))) == 8

    job.main(["--preset", "test", "--val", "3", "--seed", "2", "--out", str(tmp_path / "flags")])
    assert "16 train + 3 val images (seed 2)" in capsys.readouterr().out
    assert len(list((tmp_path / "flags" / "val2017").glob("*.png"))) == 3

    with pytest.raises(SystemExit) as exc:
        job.main(["--preset", "no-such-preset", "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2 and "no-such-preset" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
