"""Atomic publishing of files and folders: readers see the old version or the new one, never half of one.

Every writer of a finished artefact (a converted model, an exported run, a trained tower, a shapes image, a
plot) goes through here, so an interrupted job leaves at most a hidden scratch entry beside its target.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def scratch_name(target: Path) -> str:
    """The prefix of a scratch entry beside `target` (hidden, so listings of the parent skip it)."""
    return f".{target.name}.tmp-"


def is_scratch(path: Path) -> bool:
    """True for a scratch entry left beside its target by an interrupted writer."""
    return path.name.startswith(".") and ".tmp-" in path.name


@contextmanager
def publish_dir(target: Path) -> Iterator[Path]:
    """Yield an empty scratch folder beside `target`; when the block finishes, it replaces `target` (an old
    `target` is removed just before the rename). If the block raises, the scratch folder is removed and
    `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f"{scratch_name(target)}{uuid.uuid4().hex}")
    scratch.mkdir()  # a plain mkdir: the folder gets the process umask's mode, as target would
    try:
        yield scratch
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def publish_file(target: Path) -> Iterator[Path]:
    """Yield a scratch path beside `target` to write; when the block finishes it replaces `target` in one
    rename. If the block raises, the scratch file is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f"{scratch_name(target)}{os.getpid()}{target.suffix}")
    try:
        yield scratch
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)


def write_bytes_atomic(target: Path, data: bytes) -> bool:
    """Write `data` to `target` atomically; an identical existing file is left alone. True if written."""
    target = Path(target)
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return False
    with publish_file(target) as scratch:
        scratch.write_bytes(data)
    return True
