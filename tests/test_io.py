"""Atomic writes (whole files or nothing, durable, with ordinary permissions) and the readers
of user data (gzip-aware, UTF-8 without BOM, lines cut at newlines only)."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn.io import (
    DataFormatError,
    atomic_write,
    atomic_write_json,
    markdown_table,
    read_json,
    read_lines,
    read_tensor_file,
    read_text,
    remove_stale_temporaries,
    rows_to_csv,
    split_lines,
)


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
    with pytest.raises(DataFormatError, match="latin1.txt is not valid UTF-8 text"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        read_text(tmp_path / "blank.txt")
    (tmp_path / "ok.txt").write_text("één\n", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "één\n"


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """Without an fsync of the folder the rename itself may be lost in a crash."""
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert synced == [False, True]  # the file's data, then the folder's entry


def test_stale_temporaries_are_removed(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    (tmp_path / ".r.json.abc123.tmp").write_text("{half")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    assert remove_stale_temporaries(tmp_path) == [".r.json.abc123.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp", "r.json"]


def test_lines_end_at_newlines_only(tmp_path):
    # U+2028, U+2029, U+0085, form feed and a lone CR are not line ends: str.splitlines() would
    # cut there and shift every later line of a parallel corpus by one.
    text = "\ufeffone\u2028still one\r\ntwo\x85still two\nthree\x0cstill\rthree\u2029end\n"
    expected = ["one\u2028still one", "two\x85still two", "three\x0cstill\rthree\u2029end"]
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    for name in ("a.txt", "a.txt.gz"):
        assert read_text(tmp_path / name).startswith("one")  # the byte-order mark is dropped
        assert read_lines(tmp_path / name) == expected
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    with pytest.raises(DataFormatError, match="gap.txt: line 2 is empty"):
        read_lines(tmp_path / "gap.txt")
    assert read_lines(tmp_path / "gap.txt", allow_empty_lines=True) == ["a", "", "b"]


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",))), max_size=6),
       crlf=st.booleans())
def test_split_lines_inverts_joining_with_newlines(lines, crlf):
    sep = "\r\n" if crlf else "\n"
    assert split_lines("".join(line + sep for line in lines)) == lines


def test_rows_to_csv_takes_every_key_in_first_seen_order_and_joins_lists():
    rows = [{"attention": "fna", "seeds": [0, 1, 2]}, {"attention": "softmax", "alpha": None, "extra": 1.5}]
    assert rows_to_csv(rows).splitlines() == ["attention,seeds,alpha,extra", "fna,0;1;2,,", "softmax,,,1.5"]


def test_read_tensor_file_names_the_file_and_the_fault(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3, dtype=np.int16))
    got = read_tensor_file(tmp_path / "a.npy")
    assert got.dtype == torch.int16 and got.tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="weights file not found: .*missing.pt"):
        read_tensor_file(tmp_path / "missing.pt", "weights file")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"tensor file .*a.csv: unsupported file type '.csv'"):
        read_tensor_file(tmp_path / "a.csv")
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"tensor file .*bad.pt: cannot read it as .pt"):
        read_tensor_file(tmp_path / "bad.pt")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects.npy: cannot read it as .npy"):  # never unpickled
        read_tensor_file(tmp_path / "objects.npy")


def test_markdown_table_lays_out_cells_and_refuses_ragged_rows():
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |"
    assert markdown_table(["only"], []) == "| only |\n|---|"
    with pytest.raises(ValueError, match=r"a table row has 1 cells, the header 2: \[3\]"):
        markdown_table(["a", "b"], [[3]])


def test_atomic_write_files_keeps_the_folder_when_the_writer_fails(tmp_path):
    from levyattn.io import atomic_write_files

    (tmp_path / "a.bin").write_bytes(b"old a")

    def write(folder):
        Path(folder, "a.bin").write_bytes(b"new")
        Path(folder, "sub").mkdir()
        Path(folder, "sub", "b.txt").write_text("b")

    def fail(folder):
        Path(folder, "a.bin").write_bytes(b"ha")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_files(tmp_path, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"old a"
    assert atomic_write_files(tmp_path, write) == [tmp_path / "a.bin", tmp_path / "sub" / "b.txt"]
    assert (tmp_path / "a.bin").read_bytes() == b"new" and (tmp_path / "sub" / "b.txt").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "sub"]


def test_atomic_write_puts_the_data_on_disk_before_the_rename(tmp_path, monkeypatch):
    # A writer that does not fsync (matplotlib's savefig) had its file renamed unsynced: after a
    # crash the plot's name could hold an empty file.
    from levyattn import io as lio

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    lio.atomic_write(tmp_path / "plot.png", lambda tmp: Path(tmp).write_bytes(b"png"))
    replaced = next(name for kind, name in events if kind == "replace")
    assert events.index(("fsync", replaced)) < events.index(("replace", replaced))
    assert (tmp_path / "plot.png").read_bytes() == b"png"
