"""Atomic writes: whole files or nothing, with ordinary permissions."""

from __future__ import annotations

import os

import pytest

from levyattn.io import atomic_write, atomic_write_json, read_json, read_text


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


def test_read_text_names_the_file_and_the_fault(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found: .*missing.txt"):
        read_text(tmp_path / "missing.txt", "corpus")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        read_text(tmp_path / "blank.txt")
    (tmp_path / "ok.txt").write_text("één\n", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "één\n"
