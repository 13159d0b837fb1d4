"""IMDb sentiment classification from the original ``aclImdb`` tree (or the Hugging Face
hub when online), tokenised by a word vocabulary built on the training split or by any
tokenizer loaded from a local path.

The ``aclImdb`` tree (Maas et al., 2011, ``aclImdb_v1.tar.gz`` unpacked)::

    aclImdb/
      train/pos/*.txt  train/neg/*.txt   12,500 + 12,500 reviews, one per file (<id>_<rating>.txt)
      test/pos/*.txt   test/neg/*.txt    12,500 + 12,500
      train/unsup/     train/urls_*.txt  test/urls_*.txt  *.feat  imdb.vocab  imdbEr.txt  README

Only ``{train,test}/{pos,neg}/*.txt`` are read; ``unsup``, the ``urls_*`` files, the
bag-of-words ``.feat`` files and the distributed vocabulary are ignored. Labels: ``neg=0``,
``pos=1``. Reviews are read in the order of their numeric id, negatives first, so
every run sees the same dataset.

Vocabulary (``tokenizer=None``): :class:`~levyattn.data.tokenization.WordTokenizer` on the
training reviews only (lower-cased words and punctuation, ``<br />`` removed), the
``vocab_size`` most frequent words seen at least ``min_freq`` times, ids ``<pad>=0``,
``<unk>=1``; any other word (out of vocabulary, e.g. one seen only in the test split)
becomes ``<unk>``. Every review is cut to its first ``max_len`` tokens (512 by default,
the paper's setting); shorter reviews are not padded until :func:`collate_text`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from levyattn.data._common import (
    DataFormatError,
    PathLike,
    SequenceClassificationDataset,
    check_int,
    collate_text,
    find_dataset_root,
    read_text,
)
from levyattn.data.tokenization import CLASSIFIER_SPECIALS, WordTokenizer, load_tokenizer

IMDB_CLASSES = ("neg", "pos")
DEFAULT_IMDB_VOCAB = 20000

_ID_RE = re.compile(r"^(\d+)")


def _review_key(p: Path) -> tuple[int, str]:
    m = _ID_RE.match(p.name)
    return (int(m.group(1)) if m else -1, p.name)


def find_aclimdb(data_dir: PathLike) -> Path:
    """The ``aclImdb`` folder: ``data_dir`` itself or its ``aclImdb`` child."""
    return find_dataset_root(
        data_dir, "aclImdb", ("train", "test"), "IMDb data directory",
        "it has neither train/ and test/ nor an aclImdb/ subfolder",
    )  # fmt: skip


def read_aclimdb_split(data_dir: PathLike, split: str) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of one split ("train" or "test") of the ``aclImdb`` tree."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = find_aclimdb(data_dir)
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(IMDB_CLASSES):
        folder = root / split / name
        if not folder.is_dir():
            raise FileNotFoundError(f"IMDb folder not found: {folder} (expected aclImdb/{split}/{name}/*.txt)")
        files = sorted((p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file()), key=_review_key)
        if not files:
            raise DataFormatError(f"IMDb folder {folder} holds no review (*.txt) files")
        for f in files:
            texts.append(read_text(f, "IMDb review"))
            labels.append(label)
    return texts, labels


def _resolve_tokenizer(tokenizer: Any, train_texts: Sequence[str], vocab_size: int, min_freq: int, lowercase: bool):
    if tokenizer is None:
        return WordTokenizer.train(
            train_texts, vocab_size=vocab_size, min_freq=min_freq, specials=CLASSIFIER_SPECIALS, lowercase=lowercase
        )
    if isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "vocab_size")):
        raise TypeError(f"tokenizer must be None, a path or a tokenizer object, got {type(tokenizer).__name__}")
    return tokenizer


def encode_classification(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: Any,
    *,
    max_len: int,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> SequenceClassificationDataset:
    """Tokenise ``texts`` with ``tokenizer`` (cut to the first ``max_len`` ids) into a
    :class:`SequenceClassificationDataset`; a text with no token becomes one ``<unk>``."""
    max_len = check_int("max_len", max_len, 1)
    unk = getattr(tokenizer, "unk_id", None)
    filler = [unk if unk is not None else tokenizer.pad_id]
    seqs = [(tokenizer.encode(t)[:max_len] or filler) for t in texts]
    return SequenceClassificationDataset(
        seqs, labels, vocab_size=tokenizer.vocab_size, num_classes=num_classes, max_len=max_len,
        pad_id=tokenizer.pad_id, class_names=class_names,
    )  # fmt: skip


def _encode_imdb_splits(
    train: tuple[list[str], list[int]], test: tuple[list[str], list[int]], tok: Any, max_len: int
) -> tuple[SequenceClassificationDataset, SequenceClassificationDataset]:
    """The (train, test) datasets of IMDB's (texts, labels) splits encoded with ``tok``; each keeps ``tok``."""
    out = []
    for texts, labels in (train, test):
        ds = encode_classification(texts, labels, tok, max_len=max_len, num_classes=2, class_names=IMDB_CLASSES)
        ds.tokenizer = tok
        out.append(ds)
    return out[0], out[1]


def load_imdb(
    data_dir: PathLike | None = None,
    *,
    hub: str | None = None,
    max_len: int = 512,
    vocab_size: int = DEFAULT_IMDB_VOCAB,
    min_freq: int = 1,
    tokenizer: Any = None,
    lowercase: bool = True,
    cache_dir: PathLike | None = None,
) -> tuple[SequenceClassificationDataset, SequenceClassificationDataset]:
    """IMDb train and test sets from the ``aclImdb`` folder (or its parent), or, instead of
    ``data_dir``, from a Hugging Face hub id (``hub``, e.g. "stanfordnlp/imdb": splits train and
    test with columns text and label; needs ``datasets`` and the network; ``cache_dir`` is its cache).

    Items are ``(input_ids LongTensor (L,), label)`` with ``L <= max_len``, label 0 = neg,
    1 = pos; both datasets carry ``vocab_size``, ``num_classes`` (2), ``pad_id``,
    ``max_len`` and ``tokenizer`` (save it with the model: ``ds.tokenizer.save(path)``).

    tokenizer: ``None`` builds the word vocabulary from the training split (``vocab_size``
        ids at most, specials included; words seen fewer than ``min_freq`` times are
        ``<unk>``); a path loads a saved tokenizer (a Hugging Face tokenizer folder, a
        word vocabulary JSON or a SentencePiece ``.model``, see
        :func:`~levyattn.data.tokenization.load_tokenizer`); an object with ``encode``,
        ``vocab_size`` and ``pad_id`` is used as is.
    """
    if (data_dir is None) == (hub is None):
        raise ValueError(f"give one of data_dir and hub, got data_dir={data_dir!r} and hub={hub!r}")
    max_len = check_int("max_len", max_len, 1)
    vocab_size = check_int("vocab_size", vocab_size, 3)
    if hub is None:
        train = read_aclimdb_split(data_dir, "train")
        test = read_aclimdb_split(data_dir, "test")
    else:
        from levyattn.data.hub import load_hub_dataset

        ds = load_hub_dataset(hub, cache_dir=None if cache_dir is None else str(cache_dir),
                              local_alternative="load_imdb(data_dir) with the unpacked aclImdb folder")  # fmt: skip
        train, test = ((list(ds[s]["text"]), [int(y) for y in ds[s]["label"]]) for s in ("train", "test"))
    tok = _resolve_tokenizer(tokenizer, train[0], vocab_size, min_freq, lowercase)
    return _encode_imdb_splits(train, test, tok, max_len)


__all__ = [
    "DEFAULT_IMDB_VOCAB",
    "IMDB_CLASSES",
    "collate_text",
    "encode_classification",
    "find_aclimdb",
    "load_imdb",
    "read_aclimdb_split",
]
