"""atomic.py: a target is its old self or complete; temporary files never stay behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffusers_aria.utils.atomic import (
    atomic_copy,
    atomic_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    replace_dir,
)


def test_text_json_bytes_and_copy(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": 1})  # the folder is made
    with atomic_write(tmp_path / "c.bin", "wb") as fh:
        fh.write(b"\x00\x01")
    atomic_copy(tmp_path / "c.bin", tmp_path / "d.bin")
    atomic_save(tmp_path / "e.npy", lambda p: np.save(p, np.arange(3)), suffix=".npy")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": 1}
    assert (tmp_path / "d.bin").read_bytes() == b"\x00\x01"
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "c.bin", "d.bin", "e.npy", "sub"]


def test_an_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as fh:
            fh.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})  # not serialisable, after part of it was written
    with pytest.raises(OSError):
        atomic_save(target, lambda p: (open(p, "w").write("partial"), (_ for _ in ()).throw(OSError("disk full"))))
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(ValueError, match="mode 'a' is not valid"):
        with atomic_write(target, "a"):
            pass


def test_two_writers_of_one_path_use_different_temporary_files(tmp_path):
    target = tmp_path / "same.json"
    with atomic_write(target) as first, atomic_write(target) as second:
        assert first.name != second.name
        first.write("1")
        second.write("2")
    assert target.read_text() in ("1", "2") and os.listdir(tmp_path) == ["same.json"]


def test_replace_dir_moves_a_new_folder_in_and_replaces_an_old_one(tmp_path):
    for version in ("1", "2"):
        tmp = tmp_path / f".out.tmp-{version}"
        tmp.mkdir()
        (tmp / "v.txt").write_text(version)
        replace_dir(tmp, tmp_path / "out")
        assert (tmp_path / "out" / "v.txt").read_text() == version
        assert os.listdir(tmp_path) == ["out"]  # neither the temporary nor the old folder stays


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_get_the_umask_mode_not_owner_only(tmp_path, umask):
    """What the package writes is readable as the user's other files are (issue 27: they were 0600)."""
    from diffusers_aria.regions import ConditionRegions
    from diffusers_aria.utils.atomic import make_temp_dir

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        with atomic_write(tmp_path / "b.bin", "wb") as fh:
            fh.write(b"\x00")
        atomic_save(tmp_path / "c.npy", lambda p: np.save(p, np.arange(3)))  # np.save opens the temporary file
        atomic_copy(tmp_path / "b.bin", tmp_path / "d.bin")
        regions = ConditionRegions(region_ids=np.array([0, 1, 1], dtype=np.int32),
                                   centroids=np.eye(2, dtype=np.float32), metadata={})
        regions.save(str(tmp_path / "regions"))
        tmp = make_temp_dir(tmp_path / "new")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin", "c.npy", "d.bin", "regions/regions_config.json", "regions/region_ids.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    for folder in (tmp_path / "regions", tmp):
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
