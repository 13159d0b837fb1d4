"""Atomic writes: whole files or nothing, with ordinary permissions."""

from __future__ import annotations

import os

import pytest

from levyattn.io import atomic_write, atomic_write_json, read_json


def test_written_file_has_the_mode_a_plain_open_gives(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert read_json(path) == {"a": 1}


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"a": 1})

    def fail(tmp):
        with open(tmp, "w") as fh:
            fh.write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
