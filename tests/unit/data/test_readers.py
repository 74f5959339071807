"""Readers without a Ray cluster: the embedding join and the manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from trimodal.data.readers import DataDirError, attach_embeddings, embedding_shape, read_manifest


def _images(ids: list[int]) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    values = np.stack([np.full((2, 3), i, np.float16) for i in ids])
    return pa.table({"image_id": pa.array(ids, pa.int64()), "embedding": ArrowTensorArray.from_numpy(values)})


def embedding_of(images: pa.Table, image_id: int) -> np.ndarray:
    """The float16 [patches, dim] embedding of one image of an images table."""
    return np.asarray(images["embedding"][pc.index(images["image_id"], image_id).as_py()].as_py())


def test_attach_embeddings_joins_each_row_to_its_image():
    images = _images([5, 2, 9])
    rows = pa.table({"image_id": pa.array([2, 9, 7, None, 9, 5], pa.int64()),
                     "caption": ["two", "nine a", "seven", "none", "nine b", "five"]})
    joined = attach_embeddings(images, rows)
    assert joined["caption"].to_pylist() == ["two", "nine a", "nine b", "five"]  # 7 (other block) and null left out
    for row in joined.to_pylist():
        np.testing.assert_array_equal(row["embedding"], np.full((2, 3), row["image_id"], np.float16))
    assert embedding_of(images, 9)[0, 0] == 9


def test_attach_embeddings_with_no_matching_rows_is_empty():
    joined = attach_embeddings(_images([1]), pa.table({"image_id": pa.array([3], pa.int64()), "caption": ["x"]}))
    assert joined.num_rows == 0 and joined.column_names == ["image_id", "caption", "embedding"]


def test_read_manifest_refuses_an_unfinished_or_foreign_directory(tmp_path):
    with pytest.raises(DataDirError, match="no manifest.json; preprocessing has not finished"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataDirError, match="format_version 99"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "embedding": {"shape": [49, 256]}}))
    with pytest.raises(DataDirError, match="missing tables"):
        read_manifest(tmp_path)
    for name in ("images", "captions", "conversations"):
        (tmp_path / name).mkdir()
    assert embedding_shape(read_manifest(tmp_path)) == (49, 256)
