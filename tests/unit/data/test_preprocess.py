"""Preprocessing without a Ray cluster: the plan (which images, which rows), decoding, the encoder, Parquet
writing, the output swap and the CLI's error handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trimodal.config import ModelSource, VisionConfig
from trimodal.data.formats import AnnotationError
from trimodal.data.preprocess import PreprocessError, build_plan, default_cpus_per_encoder
from trimodal.data.preprocess.parquet import ParquetSink, image_schema
from trimodal.data.preprocess.pipeline import ClipEncoder, decode_images, load_image, pin_vision
from trimodal.data.preprocess.plan import ImageRecord, drop_rows_of, find_coco_splits
from trimodal.data.preprocess.publish import publish, scratch_dir
from trimodal.data.shapes.dataset import write_shapes_dataset
from trimodal.data.shapes.samples import VAL_ID_OFFSET

QUIET = lambda message: None  # noqa: E731


def coco_root(root: Path) -> Path:
    """A COCO-2017-shaped root (info, licenses, extra keys, JPEG files); image 391895 is listed twice."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    sizes = {391895: (64, 48), 522418: (40, 60)}
    for image_id, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(root / "train2017" / f"{image_id:012d}.jpg", quality=90)
    images = [{"license": 3, "file_name": f"{i:012d}.jpg", "coco_url": f"http://x/{i}.jpg", "height": h,
               "width": w, "date_captured": "2013-11-14 11:18:45", "id": i} for i, (w, h) in sizes.items()]
    doc = {"info": {"description": "COCO 2017 Dataset", "year": 2017}, "licenses": [{"id": 3, "name": "x"}],
           "images": [*images, dict(images[0])],
           "annotations": [{"image_id": 391895, "id": 770337, "caption": "A man on a moped. "},
                           {"image_id": 522418, "id": 775191, "caption": "A woman cutting a cake."},
                           {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike."}]}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))
    return root


def llava(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def chat(conv_id: str, image: str | None, question: str = "What is it?") -> dict:
    entry = {"id": conv_id, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                              {"from": "gpt", "value": "A thing."}]}
    return {**entry, "image": image} if image else entry


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, n_train=6, n_val=3, seed=0)
    return root


# --- the plan -------------------------------------------------------------------------------------------------


def test_finds_the_shapes_and_the_coco_layouts(shapes, tmp_path):
    found = find_coco_splits(shapes)
    assert [(s.split, s.annotation_file.name, s.image_dir.name) for s in found] == [
        ("train", "captions_train2017.json", "train2017"), ("val", "captions_val2017.json", "val2017")]
    assert [s.split for s in find_coco_splits(coco_root(tmp_path / "coco"))] == ["train"]


def test_every_image_is_planned_once_whether_captions_conversations_or_both_refer_to_it(shapes):
    plan = build_plan([shapes, shapes], [shapes / "llava_instruct.json", shapes / "llava_instruct_val.json"],
                      log=QUIET)
    ids = [image.image_id for image in plan.images]
    assert ids == sorted(set(ids)) and len(ids) == 9
    assert set(plan.captions["image_id"].to_pylist()) == set(ids)
    assert set(plan.conversations["image_id"].to_pylist()) == set(ids)
    written = sum(len(json.loads((shapes / "annotations" / f"captions_{split}2017.json").read_text())["annotations"])
                  for split in ("train", "val"))
    assert plan.captions.num_rows == written == 27 and plan.captions["caption"][0].as_py()  # 3 per image
    assert {i.split for i in plan.images if i.image_id > VAL_ID_OFFSET} == {"val"}


def test_conversation_split_comes_from_the_folder_that_holds_its_image(shapes, tmp_path):
    mixed = llava(tmp_path / "mixed.json", [chat("a", "000000000001.png"), chat("b", "000001000002.png"),
                                            chat("c", "coco/val2017/000001000003.png")])
    plan = build_plan([shapes], [mixed], log=QUIET)
    rows = {r["id"]: r for r in plan.conversations.to_pylist()}
    assert (rows["a"]["split"], rows["b"]["split"], rows["c"]["split"]) == ("train", "val", "val")
    assert rows["c"]["image_id"] == VAL_ID_OFFSET + 3
    assert rows["a"]["turns"] == [{"role": "user", "text": "What is it?"}, {"role": "assistant", "text": "A thing."}]


def test_text_only_conversations_are_kept_and_unknown_images_counted(shapes, tmp_path):
    entries = [chat("v", "000001000001.png"), chat("t", None, "Hello?"), chat("u", "999999999999.jpg")]
    plan = build_plan([shapes], [llava(tmp_path / "val_file.json", entries)], log=QUIET)
    rows = {r["id"]: r for r in plan.conversations.to_pylist()}
    assert set(rows) == {"v", "t"}
    assert rows["t"]["image_id"] is None and rows["t"]["split"] == "val"  # the file's split
    assert plan.counts["conversations_unknown_image"] == 1


def test_identical_conversations_in_two_files_are_kept_once(shapes, tmp_path):
    entries = [chat("a", "000000000001.png")]
    files = [llava(tmp_path / "one.json", entries), llava(tmp_path / "two.json", entries)]
    plan = build_plan([shapes], files, log=QUIET)
    assert plan.conversations.num_rows == 1 and plan.counts["duplicate_conversations"] == 1


def test_limit_keeps_the_first_images_of_each_split_and_their_rows(shapes):
    plan = build_plan([shapes], [shapes / "llava_instruct.json", shapes / "llava_instruct_val.json"], limit=2,
                      log=QUIET)
    assert [i.image_id for i in plan.images] == [1, 2, VAL_ID_OFFSET + 1, VAL_ID_OFFSET + 2]
    assert set(plan.captions["image_id"].to_pylist()) == {1, 2, VAL_ID_OFFSET + 1, VAL_ID_OFFSET + 2}
    full = build_plan([shapes], [shapes / "llava_instruct.json", shapes / "llava_instruct_val.json"], log=QUIET)
    assert plan.counts["limited_images"] == 5
    assert plan.counts["limited_captions"] == full.captions.num_rows - plan.captions.num_rows >= 15


def test_real_coco_file_with_an_image_listed_twice(tmp_path):
    root = coco_root(tmp_path / "coco")
    convo = llava(tmp_path / "llava.json", [chat("000000391895", "000000391895.jpg")])
    plan = build_plan([root], [convo], log=QUIET)
    assert [i.image_id for i in plan.images] == [391895, 522418]
    assert plan.counts["duplicate_images"] == 1
    assert plan.captions["image_id"].to_pylist() == [391895, 391895, 522418]
    assert plan.captions["caption"].to_pylist()[0] == "A man on a moped."  # sorted by annotation id, stripped


def test_malformed_annotation_fails_naming_the_file(shapes, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "x", "image": "000000000001.png", "conversations": [')
    with pytest.raises(AnnotationError, match="broken.json: invalid JSON"):
        build_plan([shapes], [broken], log=QUIET)


def test_layout_problems_are_clear(shapes, tmp_path):
    with pytest.raises(PreprocessError, match="no annotations/captions_train2017.json"):
        build_plan([tmp_path], log=QUIET)
    both = coco_root(tmp_path / "both")
    (both / "annotations" / "captions_train2014.json").write_text("{}")
    with pytest.raises(PreprocessError, match="two captions files for the train split"):
        find_coco_splits(both)
    clash = tmp_path / "clash"
    write_shapes_dataset(clash, n_train=1, n_val=0, seed=1)
    (clash / "train2017" / "000000000001.png").rename(clash / "train2017" / "renamed.png")
    doc = json.loads((clash / "annotations" / "captions_train2017.json").read_text())
    doc["images"][0]["file_name"] = "renamed.png"
    (clash / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))
    with pytest.raises(PreprocessError, match="image id 1 is listed twice"):
        build_plan([shapes, clash], log=QUIET)


def test_a_split_without_its_image_folder_is_left_out_with_a_note(tmp_path):
    root = tmp_path / "partial"
    write_shapes_dataset(root, n_train=2, n_val=2, seed=0)
    for path in (root / "val2017").iterdir():
        path.unlink()
    (root / "val2017").rmdir()
    plan = build_plan([root], log=QUIET)
    assert {i.split for i in plan.images} == {"train"}
    assert "val2017 is missing" in plan.notes[0]


# --- decoding and encoding --------------------------------------------------------------------------------------


def bad_files(directory: Path, good: Path) -> dict[str, Path]:
    """A truncated PNG, random bytes, an empty file and a missing file next to a good image."""
    directory.mkdir(exist_ok=True)
    data = good.read_bytes()
    files = {"truncated": directory / "truncated.png", "random": directory / "random.png",
             "empty": directory / "empty.png", "missing": directory / "missing.png"}
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["random"].write_bytes(np.random.default_rng(0).bytes(3000))
    files["empty"].write_bytes(b"")
    return files


def test_load_image_gives_a_reason_and_never_raises(shapes, tmp_path):
    good = shapes / "train2017" / "000000000001.png"
    files = bad_files(tmp_path, good)
    reasons = {name: load_image(str(path))[1] for name, path in files.items()}
    assert reasons["missing"] == "missing file" and reasons["empty"] == "empty file"
    assert reasons["random"] == "not an image (unrecognised format)"
    assert reasons["truncated"].startswith("corrupt or truncated image")
    gray = tmp_path / "gray.jpg"
    Image.new("L", (30, 20), 128).save(gray)
    image, reason = load_image(str(gray))
    assert reason == "" and image.size == (30, 20)


def _batch(records: list[ImageRecord]) -> dict[str, np.ndarray]:
    return {"image_id": np.array([r.image_id for r in records], np.int64),
            **{k: np.array([getattr(r, k) for r in records], dtype=object) for k in ("path", "file_name", "split")}}


def test_decode_then_encode_keeps_failed_rows_with_reasons_and_zero_features(shapes, tmp_path, test_cfg):
    good = shapes / "train2017" / "000000000001.png"
    bad = bad_files(tmp_path, good)["truncated"]
    records = [ImageRecord(1, str(good), good.name, "train"), ImageRecord(2, str(bad), bad.name, "train")]
    size = test_cfg.model.vision.image_size
    decoded = decode_images(_batch(records), size)
    assert decoded["pixel_values"].shape == (2, 3, size, size) and decoded["pixel_values"].dtype == np.float32
    assert decoded["error"][0] == "" and decoded["error"][1].startswith("corrupt")
    assert (decoded["width"][0], decoded["height"][0]) == (224, 224) and not decoded["pixel_values"][1].any()
    encoder = ClipEncoder(test_cfg.model.vision, None, use_gpu=False)
    out = encoder(decoded)
    assert out["embedding"].shape == (2, 16, 32) and out["embedding"].dtype == np.float16
    assert not out["embedding"][1].any() and "pixel_values" not in out
    import torch

    direct = encoder.tower(torch.from_numpy(decoded["pixel_values"][:1])).numpy().astype(np.float16)
    np.testing.assert_array_equal(out["embedding"][:1], direct)


# --- writing and publishing -------------------------------------------------------------------------------------


def _embeddings(n: int, start: int = 0) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    values = np.arange(start, start + n, dtype=np.float16)[:, None, None] * np.ones((1, 2, 3), np.float16)
    return pa.table({"image_id": pa.array(range(start, start + n), pa.int64()),
                     "embedding": ArrowTensorArray.from_numpy(values),
                     "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
                     "file_name": [f"{i}.png" for i in range(start, start + n)], "split": ["train"] * n})


def _write(directory: Path) -> int:
    sink = ParquetSink(directory, image_schema(2, 3), rows_per_group=4, groups_per_file=2)
    for start, n in ((0, 3), (3, 3), (6, 4)):
        sink.write(_embeddings(n, start))
    return sink.close()


def test_parquet_sink_row_groups_files_and_identical_bytes(tmp_path):
    assert _write(tmp_path / "a") == 10 and _write(tmp_path / "b") == 10
    files = sorted((tmp_path / "a").iterdir())
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [2, 1]
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    table = pq.read_table(tmp_path / "a")
    assert table["image_id"].to_pylist() == list(range(10))
    assert table.schema.field("embedding").type.shape == (2, 3)
    assert np.asarray(table["embedding"][7].as_py())[1, 2] == 7


def test_parquet_sink_writes_the_schema_even_without_rows(tmp_path):
    assert ParquetSink(tmp_path / "e", image_schema(2, 3), rows_per_group=4).close() == 0
    table = pq.read_table(tmp_path / "e")
    assert table.num_rows == 0 and table.schema.field("embedding").type.shape == (2, 3)


def test_drop_rows_of_keeps_text_only_rows():
    table = pa.table({"image_id": pa.array([1, None, 2, 1], pa.int64()), "x": ["a", "b", "c", "d"]})
    kept, dropped = drop_rows_of(table, {1})
    assert kept["x"].to_pylist() == ["b", "c"] and dropped == 2


def test_publish_replaces_the_tables_and_scratch_left_by_a_crash_is_removed(tmp_path):
    out = tmp_path / "out"
    for name in ("images", "captions", "conversations"):
        (out / name).mkdir(parents=True)
        (out / name / "old.parquet").write_text("old")
    (out / "manifest.json").write_text("{}")
    (out / ".tmp-0123456789ab").mkdir()
    tmp = scratch_dir(out)
    assert not (out / ".tmp-0123456789ab").exists()
    for name in ("images", "captions", "conversations"):
        (tmp / name).mkdir()
        (tmp / name / "new.parquet").write_text("new")
    (tmp / "manifest.json").write_text('{"new": 1}')
    publish(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["captions", "conversations", "images", "manifest.json"]
    assert [p.name for p in (out / "images").iterdir()] == ["new.parquet"]
    assert json.loads((out / "manifest.json").read_text()) == {"new": 1}


def test_cpus_per_encoder_leaves_room_for_decoding_on_small_machines():
    assert default_cpus_per_encoder(16, 2, 0.0) == 1.0
    assert default_cpus_per_encoder(2, 1, 0.0) == 1.0
    assert default_cpus_per_encoder(2, 2, 0.0) == 0.5
    assert default_cpus_per_encoder(2, 2, 1.0) == 1.0


def test_pin_vision_makes_paths_absolute_and_falls_back_to_random(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tower").mkdir()
    cfg = VisionConfig(source=ModelSource(kind="path", name="tower"), fallback_to_random=True)
    pinned, directory = pin_vision(cfg, None)
    assert pinned.source.name == str(tmp_path / "tower") and directory is None
    missing = VisionConfig(source=ModelSource(kind="path", name="nowhere"), fallback_to_random=True)
    assert pin_vision(missing, None)[0].source.kind == "random"
    with pytest.raises(PreprocessError, match="no config.json"):
        pin_vision(cfg, tmp_path / "tower")


# --- the command line -------------------------------------------------------------------------------------------


def test_cli_help_says_it_overwrites(load_job, capsys):
    with pytest.raises(SystemExit) as exc:
        load_job("preprocess").main(["--help"])
    assert exc.value.code == 0
    assert "OVERWRITES" in capsys.readouterr().out


def test_cli_malformed_annotation_is_one_clear_line_and_exit_2(load_job, shapes, tmp_path, capsys):
    bad = tmp_path / "annotations_bad.json"
    bad.write_text('{"images": 3}')
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text('{"images": [], "annotations": 7}')
    job = load_job("preprocess")
    code = job.main(["--preset", "test", "--coco-root", str(root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("[preprocess] error: ") and "captions_train2017.json" in err[0]
    assert "'annotations' must be a list" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_zero_batch_size_before_starting_ray(load_job, shapes, tmp_path, capsys):
    job = load_job("preprocess")
    code = job.main(["--preset", "test", "--coco-root", str(shapes), "--out", str(tmp_path / "out"),
                     "--batch-size", "0"])
    assert code == 2 and "--batch-size and --encoders must be >= 1" in capsys.readouterr().err
