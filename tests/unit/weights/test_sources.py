from pathlib import Path

import pytest

from trimodal.config import ModelSource
from trimodal.weights.sources import (PACKAGED, PackagedFile, SourceError, atomic_build, locate_packaged_file,
                                      resolve_source, sha256_file)


def test_packaged_file_with_wrong_hash_is_refused():
    real = PACKAGED["smollm2-135m-instruct"].files[0]
    tampered = PackagedFile(real.distribution, real.version, real.path, "0" * 64)
    with pytest.raises(SourceError, match="does not match the pinned"):
        locate_packaged_file(tampered)


def test_wrong_version_and_missing_package_say_how_to_fix():
    real = PACKAGED["smollm2-135m-instruct"].files[0]
    with pytest.raises(SourceError, match="expected the pinned 9.9.9"):
        locate_packaged_file(PackagedFile(real.distribution, "9.9.9", real.path, real.sha256))
    with pytest.raises(SourceError, match="not installed .*make install"):
        locate_packaged_file(PackagedFile("no-such-dist-xyz", "1.0", "x", "0" * 64))


def test_every_pinned_packaged_file_is_installed_and_matches():
    for name, model in PACKAGED.items():
        for spec in model.files:
            path = locate_packaged_file(spec)
            assert path.stat().st_size > 1_000_000, name


def test_path_and_unknown_sources(tmp_path: Path):
    assert resolve_source(ModelSource("path", str(tmp_path))) == tmp_path
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(ModelSource("path", str(tmp_path / "missing")))
    with pytest.raises(SourceError, match="is not one of smollm2-135m-instruct, whisper-base"):
        resolve_source(ModelSource("packaged", "gpt-17"))
    with pytest.raises(SourceError, match="build it in-process"):
        resolve_source(ModelSource("random", "tiny"))


def test_conversion_is_atomic_and_cached(tmp_path: Path):
    calls = []

    def failing(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_build(tmp_path / "m", failing)
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []

    def ok(tmp: Path) -> None:
        calls.append(1)
        (tmp / "weights").write_text("w")

    out = atomic_build(tmp_path / "m", ok)
    assert (out / "weights").read_text() == "w"
    atomic_build(tmp_path / "m", ok)
    assert len(calls) == 1  # cached: built once
    assert sha256_file(out / "weights") == "50e721e49c013f00c62cf59f2163542a9d8df02464efeb615d31051b0fddc326"


def test_a_directory_without_the_complete_marker_is_rebuilt(tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "half").write_text("from an interrupted older writer")
    out = atomic_build(tmp_path / "m", lambda tmp: (tmp / "weights").write_text("w"))
    assert sorted(p.name for p in out.iterdir()) == [".complete", "weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no scratch folder left beside it
