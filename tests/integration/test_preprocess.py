"""The Ray Data preprocessing pipeline end to end on a local Ray instance (2 CPUs), `test` preset.

Inputs: a shapes set with a truncated PNG, a file of random bytes and a missing file; a COCO-2017-shaped root
(info, licenses, extra keys, JPEGs, one image listed twice); an extra LLaVA file with a multi-turn conversation
naming its image by path, a text-only conversation and one about an unknown image. One preprocessing run is
shared by the tests; a second run into the same directory checks re-runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trimodal.config import load_config
from trimodal.data.preprocess import PipelineOptions, build_plan, run_preprocess
from trimodal.data.readers import open_stage1, open_stage2, read_manifest, read_rows
from trimodal.data.shapes.dataset import write_shapes_dataset
from trimodal.data.shapes.samples import VAL_ID_OFFSET

pytestmark = pytest.mark.slow

SKIPPED = {3: "corrupt or truncated image", 5: "not an image", VAL_ID_OFFSET + 2: "missing file"}
COCO_IDS = (391895, 522418)


@dataclass
class Inputs:
    coco_roots: list[Path]
    instruct: list[Path]


@dataclass
class Run:
    out: Path
    manifest: dict[str, Any]
    log: list[str]
    files: dict[str, bytes]
    """Every Parquet file under OUT, by relative path."""


def _coco_root(root: Path) -> Path:
    """COCO 2017 shape: info, licenses, extra keys per entry, JPEG files; image 391895 listed twice."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images = []
    for image_id, (w, h) in zip(COCO_IDS, ((64, 48), (40, 60)), strict=True):
        Image.new("RGB", (w, h), (30, 30, 200)).save(root / "train2017" / f"{image_id:012d}.jpg")
        images.append({"license": 3, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w,
                       "coco_url": "http://images.cocodataset.org/x.jpg", "date_captured": "2013-11-14",
                       "id": image_id})
    doc = {"info": {"description": "COCO 2017 Dataset", "year": 2017}, "licenses": [{"id": 3, "name": "x"}],
           "images": [*images, dict(images[0])],
           "annotations": [{"image_id": 391895, "id": 770337, "caption": "A man on a moped."},
                           {"image_id": 522418, "id": 775191, "caption": "A woman cutting a cake."},
                           {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike."}]}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))
    return root


def _extra_llava(path: Path) -> Path:
    turns = [{"from": "human", "value": "<image>\nWhat is the man riding?"}, {"from": "gpt", "value": "A moped."},
             {"from": "human", "value": "On what road?"}, {"from": "gpt", "value": "A dirt road."}]
    entries = [{"id": "000000391895", "image": "coco/train2017/000000391895.jpg", "conversations": turns},
               {"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                     {"from": "gpt", "value": "Hi."}]},
               {"id": "unknown", "image": "000000000777.jpg", "conversations": turns[:2]}]
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    shapes = root / "shapes"
    write_shapes_dataset(shapes, n_train=10, n_val=4, seed=0)
    truncated = shapes / "train2017" / "000000000003.png"
    truncated.write_bytes(truncated.read_bytes()[:400])
    (shapes / "train2017" / "000000000005.png").write_bytes(np.random.default_rng(1).bytes(2048))
    (shapes / "val2017" / f"{VAL_ID_OFFSET + 2:012d}.png").unlink()
    return Inputs([shapes, _coco_root(root / "coco")],
                  [shapes / "llava_instruct.json", shapes / "llava_instruct_val.json", _extra_llava(root / "x.json")])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _run(inputs: Inputs, out: Path) -> Run:
    log: list[str] = []
    plan = build_plan(inputs.coco_roots, inputs.instruct, log=log.append)
    opts = PipelineOptions(batch_size=4, encoders=1, progress_every_s=0.0)
    manifest = run_preprocess(plan, load_config("test").model.vision, out, opts, log=log.append)
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}
    return Run(out, manifest, log, files)


@pytest.fixture(scope="module")
def first(ray_local, inputs, tmp_path_factory) -> Run:
    return _run(inputs, tmp_path_factory.mktemp("out") / "data")


@pytest.fixture(scope="module")
def second(first, inputs) -> Run:
    return _run(inputs, first.out)


def _table(run: Run, name: str):
    import ray.data.extensions  # noqa: F401 - registers the tensor type

    return pq.read_table(run.out / name)


def _shapes_captions(inputs: Inputs) -> tuple[int, int]:
    """(captions the shapes set wrote, those of them about the skipped images): 3 per image."""
    annotations = [a for split in ("train", "val") for a in json.loads(
        (inputs.coco_roots[0] / "annotations" / f"captions_{split}2017.json").read_text())["annotations"]]
    return len(annotations), sum(1 for a in annotations if a["image_id"] in SKIPPED)


def _expected_conversations(inputs: Inputs) -> int:
    shapes = sum(len(json.loads(p.read_text())) for p in inputs.instruct[:2])
    about_skipped = sum(1 for p in inputs.instruct[:2] for c in json.loads(p.read_text())
                        if int(Path(c["image"]).stem) in SKIPPED)
    return shapes - about_skipped + 2  # + the COCO conversation and the text-only one; the unknown one is out


def test_row_counts_per_table(first, inputs):
    images, captions, conversations = (_table(first, t) for t in ("images", "captions", "conversations"))
    assert images.num_rows == 10 + 4 + 2 - 3
    written, about_skipped = _shapes_captions(inputs)
    assert captions.num_rows == written - about_skipped + 3  # + the COCO root's three
    assert conversations.num_rows == _expected_conversations(inputs)
    counts = first.manifest["counts"]
    assert (counts["images"], counts["captions"], counts["conversations"]) == (
        images.num_rows, captions.num_rows, conversations.num_rows)
    assert counts["text_only_conversations"] == 1
    assert first.manifest["splits"]["val"]["images"] == 3
    assert first.manifest["dropped"]["conversations_unknown_image"] == 1


def test_one_float16_embedding_row_per_unique_image(first):
    images = _table(first, "images")
    ids = images["image_id"].to_pylist()
    assert ids == sorted(set(ids))
    assert set(ids) == ({*range(1, 11), *range(VAL_ID_OFFSET + 1, VAL_ID_OFFSET + 5), *COCO_IDS} - set(SKIPPED))
    embedding = images.schema.field("embedding").type
    assert embedding.shape == (16, 32) and embedding.value_type == pa.float16()
    assert np.asarray(images["embedding"][0].as_py()).dtype == np.float16
    manifest = first.manifest
    assert manifest["embedding"] == {**manifest["embedding"], "shape": [16, 32], "dtype": "float16"}
    assert manifest["encoder"]["model_id"].startswith("random(") and manifest["encoder"]["untrained"] is True
    row = images.filter(pc.equal(images["image_id"], 391895)).to_pylist()[0]
    assert (row["width"], row["height"], row["split"], row["file_name"]) == (64, 48, "train", "000000391895.jpg")


def test_corrupt_and_missing_images_are_skipped_reported_and_their_rows_dropped(first, inputs):
    skipped = {s["image_id"]: s for s in first.manifest["skipped"]["images"]}
    assert set(skipped) == set(SKIPPED) and first.manifest["skipped"]["count"] == 3
    for image_id, reason in SKIPPED.items():
        assert skipped[image_id]["reason"].startswith(reason) and Path(skipped[image_id]["file"]).name
    captions, conversations = _table(first, "captions"), _table(first, "conversations")
    assert not set(SKIPPED) & set(captions["image_id"].to_pylist())
    assert not set(SKIPPED) & set(conversations["image_id"].to_pylist())
    about_skipped = _shapes_captions(inputs)[1]
    assert about_skipped >= 9  # 3 captions per image
    assert first.manifest["dropped"]["captions"] == about_skipped and first.manifest["dropped"]["conversations"] > 0
    assert any("3 images skipped" in line for line in first.log)
    assert any(line.startswith("encoded 16/16 images") for line in first.log)


def test_real_coco_file_image_listed_twice_and_multi_turn_conversation(first):
    assert first.manifest["duplicates_removed"]["duplicate_images"] == 1
    conversations = _table(first, "conversations").to_pylist()
    coco = [c for c in conversations if c["image_id"] == 391895]
    assert len(coco) == 1 and coco[0]["split"] == "train"
    assert [t["text"] for t in coco[0]["turns"]] == ["What is the man riding?", "A moped.", "On what road?",
                                                      "A dirt road."]
    assert all("<image>" not in t["text"] for c in conversations for t in c["turns"])
    val = [c for c in conversations if c["image_id"] and c["image_id"] > VAL_ID_OFFSET]
    assert val and {c["split"] for c in val} == {"val"}


def test_decoding_runs_in_tasks_and_encoding_in_the_actor_pool(first):
    assert first.manifest["pipeline"] == ["FromPandas", "MapBatches(decode_images)", "MapBatches(ClipEncoder)"]
    assert first.manifest["throughput"]["images_per_s"] > 0


def test_rerun_gives_identical_files_and_no_duplicates(first, second):
    assert second.files == first.files  # byte-identical embeddings, captions and conversations
    assert second.manifest["counts"] == first.manifest["counts"]
    images = _table(second, "images")
    assert images.num_rows == len(set(images["image_id"].to_pylist()))
    assert sorted(p.name for p in second.out.iterdir()) == ["captions", "conversations", "images",
                                                            "manifest.json"]


def _by_image(run: Run) -> dict[int, np.ndarray]:
    images = _table(run, "images")
    return {i: np.asarray(e.as_py()) for i, e in zip(images["image_id"].to_pylist(), images["embedding"], strict=True)}


def test_stage1_rows_carry_the_embedding_of_their_image(first):
    read_manifest(first.out)
    rows = open_stage1(first.out, split="train").take_all()
    captions = _table(first, "captions").to_pylist()
    assert sorted((r["image_id"], r["caption"]) for r in rows) == sorted(
        (c["image_id"], c["caption"]) for c in captions if c["split"] == "train")
    embeddings = _by_image(first)
    for row in rows:
        assert set(row) == {"image_id", "caption", "embedding"}
        assert row["embedding"].dtype == np.float16 and row["embedding"].shape == (16, 32)
        np.testing.assert_array_equal(row["embedding"], embeddings[row["image_id"]])


def test_stage2_rows_carry_the_embedding_of_their_image(first):
    conversations = _table(first, "conversations").to_pylist()
    embeddings = _by_image(first)
    rows = open_stage2(first.out, split="train").take_all()
    expected = [c for c in conversations if c["split"] == "train" and c["image_id"] is not None]
    assert sorted((r["id"], r["image_id"]) for r in rows) == sorted((c["id"], c["image_id"]) for c in expected)
    for row in rows:
        assert set(row) == {"id", "image_id", "turns", "embedding"}
        np.testing.assert_array_equal(row["embedding"], embeddings[row["image_id"]])
    coco = [r for r in rows if r["image_id"] == 391895]
    assert len(coco) == 1 and len(coco[0]["turns"]) == 4
    text_only = read_rows(first.out, "conversations", "train", ["id", "image_id"]).to_pylist()
    assert [r["id"] for r in text_only if r["image_id"] is None] == ["text-only"]  # kept, though stage 2 skips it
