"""One image of the shapes set: deterministic in (seed, split, index), with split-apart COCO ids and file names."""

from __future__ import annotations

import pytest

from trimodal.data.shapes.samples import VAL_ID_OFFSET, file_name_for, image_id_for, sample_image


def test_sample_image_depends_on_seed_split_and_index_only() -> None:
    assert sample_image(0, "val", 3) == sample_image(0, "val", 3)
    assert sample_image(0, "train", 3) != sample_image(0, "val", 3)
    assert sample_image(0, "train", 3) != sample_image(1, "train", 3)


def test_image_ids_and_file_names_keep_the_splits_apart() -> None:
    assert image_id_for("train", 0) == 1 and image_id_for("val", 0) == VAL_ID_OFFSET + 1
    assert file_name_for(42) == "000000000042.png"
    sample = sample_image(0, "val", 4)
    assert (sample.image_id, sample.file_name) == (VAL_ID_OFFSET + 5, "000001000005.png")


@pytest.mark.parametrize("args", [(0, "test", 0), (-1, "train", 0), (0, "train", -2)])
def test_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        sample_image(*args)
