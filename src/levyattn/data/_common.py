"""Shared helpers of :mod:`levyattn.data`: argument checks, file errors, the sequence datasets
and the padding collate functions. Files are read with :mod:`levyattn.io`'s readers (gzip-aware,
UTF-8 without BOM, lines cut at newlines only), re-exported here for the data modules."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

# The argument checks every data module uses (re-exported: they import them from here).
from levyattn.config import check_choice as check_choice
from levyattn.config import check_float as check_float
from levyattn.config import check_int as check_int
from levyattn.io import DataFormatError, read_bytes, read_lines, read_text

PathLike = str | os.PathLike


# -- files ------------------------------------------------------------------------------------


def require_dir(path: PathLike, what: str) -> Path:
    """``path`` as a Path if it is a directory, else FileNotFoundError naming it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_dir():
        raise NotADirectoryError(f"{what} must be a directory, but {p} is a file")
    return p


def find_dataset_root(data_dir: PathLike, folder: str, markers: Sequence[str], what: str, missing: str) -> Path:
    """A dataset's unpacked folder: ``data_dir`` itself if it holds any of ``markers``, else its
    child ``folder``; otherwise FileNotFoundError saying ``missing`` (what was looked for)."""
    root = require_dir(data_dir, what)
    if any((root / marker).exists() for marker in markers):
        return root
    if (root / folder).is_dir():
        return root / folder
    raise FileNotFoundError(f"{root} is not the {folder} folder: {missing}")


def find_file(directory: Path, names: Sequence[str], what: str) -> Path:
    """The first of ``names`` (each also tried with ``.gz``) that exists in ``directory``."""
    for name in names:
        for candidate in (name, name + ".gz"):
            p = directory / candidate
            if p.is_file():
                return p
    tried = ", ".join(f"{n}[.gz]" for n in names)
    raise FileNotFoundError(f"{what} not found in {directory}: expected one of {tried}")


# -- datasets and collate ---------------------------------------------------------------------


class SequenceClassificationDataset(torch.utils.data.Dataset):
    """Token sequences with a class label.

    Items are ``(input_ids LongTensor (L_i,), label int)`` with ``1 <= L_i <= max_len``
    and no padding inside (pad with :func:`collate_sequences`).

    Attributes: ``vocab_size``, ``num_classes``, ``pad_id`` (the padding id the collate
    uses), ``max_len`` (the longest possible item), ``class_names``.
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]] | Sequence[torch.Tensor],
        labels: Sequence[int],
        *,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        pad_id: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if len(sequences) != len(labels):
            raise ValueError(f"sequences and labels differ in length: {len(sequences)} vs {len(labels)}")
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.max_len = check_int("max_len", max_len, 1)
        self.pad_id = check_int("pad_id", pad_id, 0, self.vocab_size - 1)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self._seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
        self._labels = [int(y) for y in labels]
        # Checked here, where the item is known, rather than later in an embedding or a loss.
        for i, (seq, label) in enumerate(zip(self._seqs, self._labels)):
            if seq.dim() != 1 or not 1 <= len(seq) <= self.max_len:
                raise ValueError(
                    f"sequence {i} must be 1-D of length 1..{self.max_len} (max_len), got {tuple(seq.shape)}"
                )
            if not 0 <= label < self.num_classes:
                raise ValueError(f"label {i} must be in 0..{self.num_classes - 1}, got {label}")
        if self._seqs:
            ids = torch.cat(self._seqs)
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                bad = next(i for i, seq in enumerate(self._seqs) if seq.min() < 0 or seq.max() >= self.vocab_size)
                raise ValueError(
                    f"sequence {bad} has token ids {self._seqs[bad].min().item()}..{self._seqs[bad].max().item()}, "
                    f"outside 0..vocab_size-1={self.vocab_size - 1}"
                )

    def __len__(self) -> int:
        return len(self._seqs)

    draws_random_numbers = False  # read by the trainer

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._seqs[i], self._labels[i]

    @property
    def labels(self) -> list[int]:
        return list(self._labels)


def pad_sequences(seqs: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors: ``(ids (B, L) long, padding_mask (B, L) bool True = padding)``."""
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty batch (no sequences)")
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
    length = max(int(s.shape[0]) for s in seqs)
    ids = torch.full((len(seqs), length), int(pad_id), dtype=torch.long)
    mask = torch.ones((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = int(s.shape[0])
        ids[i, :n] = s
        mask[i, :n] = False
    return ids, mask


def collate_sequences(
    samples: Sequence[tuple[torch.Tensor, int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch ``(input_ids (L_i,), label)`` items.

    Returns ``(input_ids (B, L) long, key_padding_mask (B, L) bool True = padding,
    labels (B,) long)``, right-padded with ``pad_id`` to the longest item.
    The mask, not the pad id, says what is padding.
    """
    ids, mask = pad_sequences([s[0] for s in samples], pad_id)
    labels = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)
    return ids, mask, labels


collate_text = collate_sequences

__all__ = [
    "DataFormatError",
    "PathLike",
    "SequenceClassificationDataset",
    "check_choice",
    "check_float",
    "check_int",
    "collate_sequences",
    "collate_text",
    "find_file",
    "pad_sequences",
    "read_bytes",
    "read_lines",
    "read_text",
    "require_dir",
]
