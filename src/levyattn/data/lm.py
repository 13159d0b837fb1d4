"""Language-modelling data: any UTF-8 text files (gzipped or not) or a Hugging Face
dataset, tokenised and cut into contiguous blocks.

Each file is one document; documents are joined with ``eos_id`` between them (so a
model sees where one ends), then the token stream is split: the last ``val_fraction``
of the tokens are the validation stream. Items are contiguous blocks
``(input_ids LongTensor (L,), targets LongTensor (L,))`` with ``targets`` the inputs
shifted by one token (``targets[t] = stream[start + t + 1]``); blocks start every
``stride`` tokens (``stride = block_size``: no overlap, each token predicted once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from levyattn.data._common import PathLike, check_float, check_int, read_text
from levyattn.data.tokenization import ByteTokenizer, load_tokenizer, train_tokenizer


class LMBlockDataset(torch.utils.data.Dataset):
    """Contiguous blocks of a token stream.

    tokens: 1-D LongTensor; block ``i`` is ``tokens[i*stride : i*stride + block_size]`` and its
    targets ``tokens[i*stride + 1 : i*stride + block_size + 1]``. Needs at least
    ``block_size + 1`` tokens. Attributes: ``vocab_size``, ``block_size``, ``pad_id``.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, *, vocab_size: int, stride: int | None = None,
                 pad_id: int = 0) -> None:  # fmt: skip
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.block_size = check_int("block_size", block_size, 1)
        self.stride = check_int("stride", stride if stride is not None else block_size, 1)
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.pad_id = int(pad_id)
        if tokens.numel() < self.block_size + 1:
            raise ValueError(
                f"the token stream has {tokens.numel()} tokens, fewer than block_size + 1 = {self.block_size + 1}: "
                "use more text or a smaller block_size"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size - 1}], found {tokens.min()}..{tokens.max()}")
        self.tokens = tokens
        self._n = (tokens.numel() - self.block_size - 1) // self.stride + 1

    def __len__(self) -> int:
        return self._n

    draws_random_numbers = False  # read by the trainer

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._n <= i < self._n:
            raise IndexError(f"block {i} out of range for {self._n} blocks")
        start = (i % self._n) * self.stride
        chunk = self.tokens[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def collate_lm(samples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (B, L), targets (B, L))`` (all blocks have the same length)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty batch")
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


@dataclass
class LMData:
    """Train and validation block datasets and the tokenizer (save it with the model)."""

    train: LMBlockDataset
    valid: LMBlockDataset
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def _stream(docs: Sequence[str], tokenizer: Any) -> torch.Tensor:
    eos = getattr(tokenizer, "eos_id", None)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def build_lm_data(
    docs: Sequence[str],
    *,
    tokenizer: Any = "byte",
    vocab_size: int = 8000,
    block_size: int = 128,
    val_fraction: float = 0.1,
    stride: int | None = None,
    valid_docs: Sequence[str] | None = None,
) -> LMData:
    """Tokenise documents and cut them into train / validation blocks.

    tokenizer: "byte" (no training), "sentencepiece", "bpe" or "word" (trained on the
        training text only: the documents before the split, or all ``docs`` when
        ``valid_docs`` is given), a saved tokenizer path, or a tokenizer object.
    valid_docs: a separate validation text; otherwise the last ``val_fraction`` of the
        characters of ``docs`` (cut at a document boundary when there are several
        documents, else inside the one document).
    """
    if not docs:
        raise ValueError("no documents: give at least one non-empty text")
    block_size = check_int("block_size", block_size, 1)
    if valid_docs is None:
        val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        train_docs, valid_docs = _split_docs(list(docs), val_fraction)
    else:
        train_docs = list(docs)
    if isinstance(tokenizer, str) and tokenizer in ("byte", "sentencepiece", "bpe", "word"):
        tok = train_tokenizer(train_docs, tokenizer, vocab_size=vocab_size) if tokenizer != "byte" else ByteTokenizer()
    elif isinstance(tokenizer, str | Path):
        tok = load_tokenizer(tokenizer)
    elif hasattr(tokenizer, "encode"):
        tok = tokenizer
    else:
        raise TypeError(f"tokenizer must be a kind name, a path or a tokenizer object, got {type(tokenizer).__name__}")
    pad = int(getattr(tok, "pad_id", 0) or 0)
    train = LMBlockDataset(_stream(train_docs, tok), block_size, vocab_size=tok.vocab_size, stride=stride, pad_id=pad)
    valid = LMBlockDataset(_stream(valid_docs, tok), block_size, vocab_size=tok.vocab_size, stride=None, pad_id=pad)
    info = {"train_tokens": int(train.tokens.numel()), "valid_tokens": int(valid.tokens.numel())}
    return LMData(train, valid, tok, info)


def _split_docs(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    total = sum(len(d) for d in docs)
    target = total * (1.0 - val_fraction)
    if len(docs) > 1:
        acc = 0
        for k, d in enumerate(docs):
            acc += len(d)
            if acc >= target:
                cut = min(max(k + 1, 1), len(docs) - 1)
                return docs[:cut], docs[cut:]
    text = "\n".join(docs)
    cut = int(round(len(text) * (1.0 - val_fraction)))
    return [text[:cut]], [text[cut:]]


def read_text_files(paths: Sequence[PathLike] | PathLike) -> list[str]:
    """The UTF-8 text of each file (gzipped or not; a folder means its ``*.txt`` files,
    sorted). An empty or undecodable file raises an error naming it."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith((".txt", ".txt.gz")))
            if not found:
                raise FileNotFoundError(f"no *.txt or *.txt.gz files in the folder {p}")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise ValueError("no text files given")
    docs = []
    for f in files:
        docs.append(read_text(f, "text file"))
    return docs


def load_text_files(
    paths: Sequence[PathLike] | PathLike,
    *,
    tokenizer: Any = "byte",
    vocab_size: int = 8000,
    block_size: int = 128,
    val_fraction: float = 0.1,
    valid_paths: Sequence[PathLike] | PathLike | None = None,
    stride: int | None = None,
) -> LMData:
    """Language-modelling blocks from text files (see :func:`build_lm_data`)."""
    docs = read_text_files(paths)
    valid = read_text_files(valid_paths) if valid_paths is not None else None
    data = build_lm_data(docs, tokenizer=tokenizer, vocab_size=vocab_size, block_size=block_size,
                         val_fraction=val_fraction, stride=stride, valid_docs=valid)  # fmt: skip
    data.info["files"] = len(docs)
    return data


def load_lm_hub(
    name: str,
    *args: Any,
    text_column: str = "text",
    train_split: str = "train",
    valid_split: str | None = "validation",
    tokenizer: Any = "byte",
    vocab_size: int = 8000,
    block_size: int = 128,
    val_fraction: float = 0.1,
    cache_dir: PathLike | None = None,
) -> LMData:
    """Language-modelling blocks from a Hugging Face dataset (needs ``datasets`` and the
    network), e.g. ``load_lm_hub("wikitext", "wikitext-2-raw-v1")``; each row of
    ``text_column`` is a document (empty rows are skipped)."""
    from levyattn.data.hub import load_hub_dataset

    ds = load_hub_dataset(name, *args, cache_dir=None if cache_dir is None else str(cache_dir),
                          local_alternative="load_text_files(paths) with your own .txt files")  # fmt: skip
    train = [t for t in ds[train_split][text_column] if t and t.strip()]
    valid = None
    if valid_split is not None and valid_split in ds:
        valid = [t for t in ds[valid_split][text_column] if t and t.strip()]
    data = build_lm_data(train, tokenizer=tokenizer, vocab_size=vocab_size, block_size=block_size,
                         val_fraction=val_fraction, valid_docs=valid)  # fmt: skip
    data.info["dataset"] = name
    return data


__all__ = [
    "LMBlockDataset",
    "LMData",
    "build_lm_data",
    "collate_lm",
    "load_lm_hub",
    "load_text_files",
    "read_text_files",
]
