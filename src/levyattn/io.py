"""Files: atomic writes, and the one way the project reads user data.

Writes go to a temporary file in the same folder, which is flushed to disk, moved onto
the target with ``os.replace`` and followed by an fsync of the folder, so an
interrupted run (even one killed with SIGKILL, or a power cut) never leaves a
half-written result, checkpoint or report behind: the old file or the new one.

Reads (:func:`read_bytes`, :func:`read_text`, :func:`read_lines`) take plain or gzipped
files (told apart by their first bytes, not their name) and raise errors that name the
file and what is wrong with it. Text is UTF-8; a leading byte-order mark is dropped, and
lines end at ``\\n`` (or ``\\r\\n``) only, never at the other characters
``str.splitlines`` splits on (U+2028, U+0085, form feed, ...), which can occur inside a
sentence and would shift every following line of a parallel corpus. Tensor files
(.npy, .npz, .pt/.pth, .safetensors) are read by :func:`read_tensor_file`, never running pickled code.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
TENSOR_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


class DataFormatError(ValueError):
    """A data file exists but its content is not what its format requires.

    The message always names the file and what is wrong with it.
    """


# ----------------------------------------------------------------------------- writing


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face hub id ("name" or "owner/name"), which a
    path that does not exist is then taken for; "/data/model", "./model" or "a/b/c" have not."""
    return bool(_HUB_ID.match(text))


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush ``directory``'s entries to disk, so a rename or delete in it survives a crash
    (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders; the rename itself is done
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush the file ``path``'s data to disk (before it is renamed into place: otherwise a
    crash can leave the new name pointing at an empty file)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the temporary file, move it onto ``path`` and fsync the folder.

    The temporary file is ``.<name>.<random>.tmp`` beside ``path``; it is removed when
    ``write`` fails, and only a killed process can leave one behind
    (:func:`remove_stale_temporaries` cleans those up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)  # writers such as savefig do not fsync themselves
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_files(directory: str | os.PathLike, write: Callable[[str], None]) -> list[Path]:
    """Call ``write(tmp_dir)``, which writes files into an empty temporary folder, then move each
    file onto the same relative path in ``directory`` (fsynced, ``os.replace``, folders fsynced).

    For writers that fill a folder themselves (``save_pretrained``): a process killed while
    ``write`` runs leaves every file in ``directory`` as it was; killed while the files are
    moved, each file is the old one or the new one, never half of either. The temporary folder
    ``.save.<random>.tmp`` inside ``directory`` is removed, also when ``write`` fails. Returns
    the paths written.
    """
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".save.", suffix=TMP_SUFFIX, dir=directory))
    try:
        write(str(tmp_dir))
        files = sorted(p for p in tmp_dir.rglob("*") if p.is_file())
        for p in files:
            fsync_file(p)
        written = []
        for p in files:
            target = directory / p.relative_to(tmp_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, target)
            fsync_dir(target.parent)
            written.append(target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return written


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: one line of ``header`` cells, the rule, then a line per row (cells as
    ``str``); a row must have as many cells as the header."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells, the header {len(header)}: {list(row)!r}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of ``rows``: one column per key, in the order keys first appear (a row without a
    key leaves its cell empty); a list value becomes one cell, its items joined by ``;``."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()})
    return buf.getvalue()


def check_writable(directory: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``directory`` if needed and make sure files can be written in it (by writing and
    removing a temporary file), so that a long job fails at its start, not at its first save.

    Raises PermissionError naming the folder.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=TMP_SUFFIX, dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise PermissionError(f"{what} {directory} is not writable: {err.strerror or err}") from err
    return directory


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``directory``;
    return their names. Only for folders no other process is writing to."""
    directory = Path(directory)
    stale = sorted(p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file())
    for p in stale:
        p.unlink()
    if stale:
        fsync_dir(directory)
    return [p.name for p in stale]


# ----------------------------------------------------------------------------- reading


@contextmanager
def open_bytes(path: str | os.PathLike, what: str = "file") -> Iterator[BinaryIO]:
    """``path`` opened for reading bytes, through gzip when it starts with the gzip magic bytes.

    The gzip test looks at the bytes, not the extension, so a renamed file still reads;
    a truncated or corrupt gzip stream raises :class:`DataFormatError` when it is read.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    with open(p, "rb") as fh:
        gzipped = fh.read(2) == GZIP_MAGIC
    if not gzipped:
        with open(p, "rb") as fh:
            yield fh
        return
    try:
        with gzip.open(p, "rb") as fh:
            yield fh
    except (OSError, EOFError, zlib.error) as err:
        raise DataFormatError(f"{what} {p} is not a valid gzip file: {err}") from err


def read_at_most(fh: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``fh``, read in chunks: memory follows what the stream holds,
    not what a (possibly corrupt) header claims."""
    chunks, size = [], 0
    while size < limit:
        chunk = fh.read(min(_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The content of ``path``, gunzipped when it is gzipped (see :func:`open_bytes`)."""
    with open_bytes(path, what) as fh:
        return fh.read()


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """The UTF-8 text of ``path`` (gzipped or not), without a leading byte-order mark and with
    its line endings as they are.

    Errors name the file and what is wrong: FileNotFoundError when it is missing,
    :class:`DataFormatError` (a ValueError) when it is not UTF-8 or holds nothing but
    whitespace.
    """
    data = read_bytes(path, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{what} {path} is not valid UTF-8 text (byte {err.start}: {err.reason})") from err
    if not text.strip():
        raise DataFormatError(f"{what} {path} is empty")
    return text


def split_lines(text: str) -> list[str]:
    """``text`` cut at ``\\n`` (a ``\\r`` before it belongs to the line ending), without terminators.

    Unlike ``str.splitlines`` it does not cut at U+2028, U+2029, U+0085, form feeds or a
    lone ``\\r``: those stay inside their line. One final newline makes no empty last line.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str | os.PathLike, what: str = "text file", *, allow_empty_lines: bool = False) -> list[str]:
    """The lines of a UTF-8 text file (gzipped or not; see :func:`read_text`, :func:`split_lines`).

    An empty file, or (unless ``allow_empty_lines``) an empty line, raises
    :class:`DataFormatError` naming the file and the line number (1-based).
    """
    lines = split_lines(read_text(path, what))
    if not allow_empty_lines:
        for i, line in enumerate(lines):
            if not line.strip():
                raise DataFormatError(f"{what} {path}: line {i + 1} is empty")
    return lines


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Load JSON (UTF-8, a byte-order mark allowed) with an error that names the file and what
    is wrong with it: FileNotFoundError, or :class:`DataFormatError` (a ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{what} {path} is not valid JSON: {err}") from err


def read_tensor_file(path: str | os.PathLike, what: str = "tensor file") -> Any:
    """What a .npy/.npz/.pt/.pth/.safetensors file holds, with torch tensors for arrays (dtypes kept).

    .npy gives one tensor; .npz and .safetensors a ``{name: tensor}`` dict; .pt/.pth whatever
    was saved, read with ``torch.load(weights_only=True)`` (tensors and plain containers,
    never arbitrary pickled code). .npy/.npz are read with ``allow_pickle=False``.

    Errors name the file: FileNotFoundError when it is missing, ValueError for another suffix
    or content that does not read as its suffix says.
    """
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise ValueError(f"{what} {path}: unsupported file type {suffix!r}; expected one of {TENSOR_SUFFIXES}")
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: torch.from_numpy(data[k]) for k in data.files}
        if suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as err:  # corrupt files raise many error types (unpickling, OSError, TypeError, ...)
        raise ValueError(f"{what} {path}: cannot read it as {suffix} ({type(err).__name__}: {err})") from err
