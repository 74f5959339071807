"""Atomic publishing: the target is the old version or the new one, never a mix, and no scratch is left."""

from __future__ import annotations

import pytest

from trimodal.files import is_scratch, publish_dir, publish_file, write_bytes_atomic


def test_publish_dir_replaces_the_old_folder_only_when_the_block_finishes(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with publish_dir(target) as scratch:
        (scratch / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # readers still see the old one
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkdtemp's private 0700


def test_publish_dir_leaves_the_target_alone_and_no_scratch_when_the_block_fails(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with publish_dir(target) as scratch:
            (scratch / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_publish_file_and_write_bytes_atomic(tmp_path):
    target = tmp_path / "a" / "plot.png"
    with pytest.raises(ValueError):
        with publish_file(target) as scratch:
            assert is_scratch(scratch) and scratch.suffix == ".png"
            scratch.write_bytes(b"half")
            raise ValueError
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
    assert write_bytes_atomic(target, b"png") is True
    assert write_bytes_atomic(target, b"png") is False  # identical: untouched
    assert target.read_bytes() == b"png" and [p.name for p in target.parent.iterdir()] == ["plot.png"]
