"""The synthetic shapes set: determinism, layout, geometry, coverage, and answers consistent with the meta file."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import trimodal.data.shapes as shapes_module
from trimodal.data.formats import (
    index_by_file_name,
    read_coco_captions,
    read_llava_instruct,
    resolve_llava_image,
)
from trimodal.data.shapes import (
    COLORS,
    EDGE_MARGIN,
    IMAGE_SIZE,
    PHRASINGS,
    SHAPES,
    SIDE_MIN_DX,
    TWO_OBJECT_SHARE,
    VAL_ID_OFFSET,
    apart,
    caption_for,
    encode_png,
    parse_answer,
    phrasing_of,
    read_shapes_meta,
    render,
    sample_image,
    write_shapes_dataset,
)
from trimodal.evaluation.scoring import answer_correct, described_objects, tokens

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
    assert sample_image(0, "val", 3) == sample_image(0, "val", 3)
    assert sample_image(0, "train", 3) != sample_image(0, "val", 3)


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
        assert set(per_image.values()) == {3}
        llava = dataset / ("llava_instruct.json" if split == "train" else "llava_instruct_val.json")
        by_name = index_by_file_name(images)
        conversations = read_llava_instruct(llava)
        assert all(resolve_llava_image(c.image, by_name) is not None for c in conversations)
        assert {c.image for c in conversations} == {p.name for p in pngs}
        assert len({c.id for c in conversations}) == len(conversations)
    assert sorted(p.name for p in dataset.iterdir()) == [
        "annotations", "llava_instruct.json", "llava_instruct_val.json", "shapes_meta.json", "train2017", "val2017"]


def test_shapes_are_apart_inside_and_drawn_in_their_colour() -> None:
    for index in range(150):
        sample = sample_image(7, "train", index)
        assert len(sample.objects) in (1, 2)
        assert min(sample.background) >= 200
        if len(sample.objects) == 2:
            a, b = sample.objects
            assert apart(a, b)
            assert a.color != b.color
        pixels = render(sample).load()
        for obj in sample.objects:
            x, y, w, h = obj.bbox()
            assert x >= EDGE_MARGIN and y >= EDGE_MARGIN
            assert x + w <= IMAGE_SIZE - EDGE_MARGIN and y + h <= IMAGE_SIZE - EDGE_MARGIN
            assert pixels[obj.cx, obj.cy] == COLORS[obj.color]


def test_all_colour_shape_pairs_are_covered() -> None:
    samples = [sample_image(0, "train", i) for i in range(200)]
    pairs = Counter((o.color, o.shape) for s in samples for o in s.objects)
    assert set(pairs) == {(c, s) for c in COLORS for s in SHAPES}
    counts = Counter(len(s.objects) for s in samples)
    assert counts[1] > 50 and counts[2] > 50
    assert any(s.objects[0].shape == s.objects[1].shape for s in samples if len(s.objects) == 2)


def test_two_shape_share_and_images_kept_from_the_half_share(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 400
    now = [sample_image(0, "train", i) for i in range(n)]
    share = sum(len(s.objects) == 2 for s in now) / n
    assert abs(share - TWO_OBJECT_SHARE) < 3 * (TWO_OBJECT_SHARE * (1 - TWO_OBJECT_SHARE) / n) ** 0.5
    monkeypatch.setattr(shapes_module, "TWO_OBJECT_SHARE", 0.5)
    before = [sample_image(0, "train", i) for i in range(n)]
    changed = [i for i in range(n) if before[i] != now[i]]
    assert all(len(before[i].objects) == 1 and len(now[i].objects) == 2 for i in changed)
    assert 0 < len(changed) < n * (TWO_OBJECT_SHARE - 0.5) * 2  # only images drawn between the two cuts


def test_captions() -> None:
    sample = next(s for s in (sample_image(0, "train", i) for i in range(50)) if len(s.objects) == 2)
    canonical = caption_for(sample.objects)
    assert sample.captions[0] == canonical
    assert re.fullmatch(r"an? \w+ \w+ and an? \w+ \w+", canonical)
    assert len(set(sample.captions)) == 3
    orange = [s for s in (sample_image(0, "train", i) for i in range(60)) if s.objects[0].color == "orange"]
    assert orange and orange[0].captions[0].startswith("an orange ")


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


def test_left_and_right_are_the_shapes_by_centre_x() -> None:
    asked = 0
    for index in range(120):
        sample = sample_image(5, "val", index)
        for q in (q for conv in sample.conversations for q in conv if q.type == "side"):
            left, right = sorted(sample.objects, key=lambda o: o.cx)
            pixels = render(sample).load()
            side = left if re.search(r"\bleft(most)?\b", q.question) else right
            assert pixels[side.cx, side.cy] == COLORS[q.expected] and q.expected == side.color
            assert answer_correct("side", q.answer, q.expected) and side.color in tokens(q.answer)
            asked += 1
    assert asked > 20


def test_every_type_has_many_wordings_and_the_design_forms_are_seen() -> None:
    assert set(PHRASINGS) == {"color", "shape", "count", "describe", "exists", "side"}
    for qtype, sets in PHRASINGS.items():
        assert len(sets["seen"]) >= 8 and 2 <= len(sets["held_out"]) <= 3, qtype
        assert not set(sets["seen"]) & set(sets["held_out"])
    design = {"color": "What color is {thing}?", "shape": "What shape is {thing}?",
              "count": "How many shapes are there?", "describe": "Describe the image."}
    for qtype, form in design.items():
        assert PHRASINGS[qtype]["seen"][0] == form
    assert phrasing_of("What color is the circle?") == ("color", "seen")
    assert phrasing_of("What shape is the red object?") == ("shape", "seen")
    assert phrasing_of("  what colour   IS the square? ") == ("color", "seen")
    assert phrasing_of("name the color of the circle.") == ("color", "held_out")  # Whisper's spelling, no capital
    assert phrasing_of("Which color does the circle have?") == ("color", "held_out")  # the demo's spoken question
    assert phrasing_of("What is the capital of France?") is None


def test_held_out_wordings_never_appear_in_training_and_val_asks_both(tmp_path: Path) -> None:
    write_shapes_dataset(tmp_path, 150, 60, seed=3)
    seen = {"train": Counter(), "val": Counter()}
    for split, name in (("train", "llava_instruct.json"), ("val", "llava_instruct_val.json")):
        for conv in read_llava_instruct(tmp_path / name):
            for turn in conv.turns[::2]:
                qtype, which = phrasing_of(turn.text)
                seen[split][qtype, which] += 1
    assert {which for _, which in seen["train"]} == {"seen"}
    for qtype in PHRASINGS:
        assert seen["train"][qtype, "seen"] > 0
        assert seen["val"][qtype, "seen"] > 0 and seen["val"][qtype, "held_out"] > 0, qtype
    train_questions = {q.question for t in read_shapes_meta(tmp_path / "shapes_meta.json") if t.split == "train"
                       for q in t.questions}
    assert all(phrasing_of(q)[1] == "seen" for q in train_questions)


def test_wordings_answers_and_first_turns_are_varied_and_yes_no_is_balanced() -> None:
    samples = [sample_image(0, "train", i) for i in range(300)]
    questions = [q for s in samples for conv in s.conversations for q in conv]
    for qtype in PHRASINGS:
        asked = [q for q in questions if q.type == qtype]
        assert len({q.question for q in asked}) >= 8 and len({q.answer for q in asked}) >= 4, qtype
    first = Counter(conv[0].type for s in samples for conv in s.conversations)
    assert set(first) == set(PHRASINGS) and min(first.values()) > 15
    answers = Counter(q.expected for q in questions if q.type == "exists")
    assert abs(answers["yes"] - answers["no"]) < 0.15 * len(samples)


def test_read_shapes_meta_round_trips(dataset: Path) -> None:
    truths = read_shapes_meta(dataset / "shapes_meta.json")
    assert [t.split for t in truths] == ["train"] * N_TRAIN + ["val"] * N_VAL
    sample = sample_image(0, "val", 2)
    truth = next(t for t in truths if t.image_id == sample.image_id)
    assert truth.objects == sample.objects
    assert [q.question for q in truth.questions] == [q.question for c in sample.conversations for q in c]
    assert [q.phrasing for q in truth.questions] == [q.phrasing for c in sample.conversations for q in c]


def test_parse_answer() -> None:
    assert parse_answer("color", "The circle is Red.") == "red"
    assert parse_answer("shape", "It is a triangle.") == "triangle"
    assert parse_answer("shape", "Two squares") == "square"
    assert parse_answer("count", "There are 2 shapes.") == "two"
    assert parse_answer("count", "There is one shape.") == "one"
    assert parse_answer("color", "I cannot tell.") is None
    assert parse_answer("side", "The left shape is purple.") == "purple"
    assert parse_answer("exists", "No, there is no red circle.") == "no"
    assert parse_answer("describe", "A red circle. ") == "a red circle"
    with pytest.raises(ValueError, match="unknown question type"):
        parse_answer("size", "big")


def test_png_encoding_is_stable() -> None:
    sample = sample_image(3, "train", 11)
    assert encode_png(render(sample)) == encode_png(render(sample))


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
