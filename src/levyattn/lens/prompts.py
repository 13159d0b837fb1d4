"""Prompts for the lens: random token ids as the published tool draws them, or windows of a text.

``corpus="random"``: ids drawn uniformly from ``[1000, min(V - 1, 49000)]`` (V the tokenizer's
``vocab_size`` as published, else the config's) with Python's ``random.Random(seed).randint``,
as the published tool does. A vocabulary too small for that range (V <= 1000) gets the range
``[low, V - 1]`` with ``low`` the first id after the special tokens and at least ``V // 50``
(the published range likewise skips the low ids, where special and byte tokens live).
An explicit ``token_range=(low, high)`` must lie inside the model's vocabulary
(``high < config.vocab_size``, else the tokenizer's length when the model does not say); for a
model given by path or cached hub id, :func:`measure_decay` checks it against the saved
config before the weights load.
``corpus=PATH``: a UTF-8 text file tokenised with the model's tokenizer (no special tokens
added); each prompt is a window of consecutive tokens at an offset drawn with
``random.Random(seed)``, with replacement: a text too short for the prompts asked repeats
windows, which :meth:`Prompts.check_distinct` refuses (or, for a few, says).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from levyattn.io import read_text

#: Tokens before the key in the published protocol: the sequence for distance d has d + PREFIX tokens.
PREFIX = 50
TOKEN_LOW = 1000
TOKEN_HIGH_CAP = 49_000
_RANGE_HINT = "give one with --token-range LOW HIGH (token_range=(low, high) in Python)"


class CorpusNeedsTokenizer(ValueError):
    """A text corpus was given for a model without a tokenizer; ``path`` is the corpus file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"corpus {path} is text and needs a tokenizer; pass tokenizer= (or load the model by path)")


class Prompts:
    """Token-id prompts for a seed: random ids (published) or windows of a tokenised text."""

    def __init__(self, low: int, high: int, stream: np.ndarray | None, source: str) -> None:
        self.low, self.high, self.stream, self.source = low, high, stream, source

    def draw(self, seed: int, n: int, length: int) -> np.ndarray:
        """(n, length) int64 token ids for ``seed``."""
        if self.stream is None:
            rng = random.Random(seed)
            # Exactly the published generator: randint per token, prompt after prompt.
            toks = [[rng.randint(self.low, self.high) for _ in range(length)] for _ in range(n)]
            return np.asarray(toks, dtype=np.int64).reshape(n, length)
        starts = self.window_starts(seed, n, length)
        return np.stack([self.stream[s : s + length] for s in starts]).astype(np.int64)

    def window_starts(self, seed: int, n: int, length: int) -> list[int]:
        """The offsets in the text of the ``n`` windows of ``length`` tokens that ``draw`` returns (text only)."""
        if self.stream is None:
            raise ValueError("random-token prompts are not windows of a text")
        avail = self.stream.size - length + 1
        if avail < 1:
            raise ValueError(
                f"corpus {self.source} has {self.stream.size} tokens; a prompt needs {length} (distance + {PREFIX})"
            )
        rng = random.Random(seed)
        return [rng.randrange(avail) for _ in range(n)]

    def check_distinct(self, seeds: Sequence[int], n: int, length: int) -> dict:
        """Refuse text windows that repeat enough to narrow the CI; returns the counts to record.

        Windows are drawn with replacement, so a short text repeats them; a repeated window is
        the same prompt counted again. With ``k`` distinct windows among ``m`` prompts the CI's
        half-width is about ``sqrt(k / m)`` of what the text supports: more than 5% narrower
        (``k / m < 0.9025``) is refused (ValueError); fewer repeats give a RuntimeWarning.
        """
        starts = [s for seed in seeds for s in self.window_starts(int(seed), n, length)]
        distinct, total = len(set(starts)), len(starts)
        if distinct < total:
            said = (
                f"{total - distinct} of the {total} prompts of {length} tokens repeat a window of corpus {self.source} "
                f"({self.stream.size} tokens, {self.stream.size - length + 1} windows; {distinct} distinct drawn)"
            )
            if distinct / total < 0.9025:
                raise ValueError(
                    f"{said}: counted as new prompts they would narrow the CI by about "
                    f"{1 - (distinct / total) ** 0.5:.0%}; give a longer text, or fewer prompts or seeds"
                )
            warnings.warn(f"{said}; each counts as a prompt", RuntimeWarning, stacklevel=3)
        return {"length": length, "prompts": total, "distinct_windows": distinct}


def _vocabulary(tokenizer: Any, model: Any) -> tuple[int | None, str]:
    vocab = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    if vocab:
        return int(vocab), "tokenizer.vocab_size"
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(model, "vocab_size", None)
    return (int(vocab), "config.vocab_size") if vocab else (None, "")


def _model_vocabulary(tokenizer: Any, model: Any) -> tuple[int | None, str]:
    """The number of token ids the model embeds (its config's), else the tokenizer's full length."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(model, "vocab_size", None)
    if vocab:
        return int(vocab), "config.vocab_size" if getattr(config, "vocab_size", None) else "model.vocab_size"
    if tokenizer is not None and callable(getattr(tokenizer, "__len__", None)) and len(tokenizer) > 0:
        return len(tokenizer), "len(tokenizer)"
    return None, ""


def check_token_range_fits(token_range: tuple[int, int], vocab: int, source: str) -> None:
    """Refuse a ``token_range`` whose ``high`` is past a vocabulary of ``vocab`` ids (read from ``source``)."""
    low, high = token_range
    if high >= vocab:
        # ids past the embedding table fail deep in the model, or are hashed silently by a stand-in
        raise ValueError(
            f"token_range ({low}, {high}) exceeds the vocabulary of {vocab} tokens ({source}); "
            f"it needs 0 <= low <= high <= {vocab - 1} (--token-range LOW HIGH on the command line)"
        )


def random_token_range(tokenizer: Any, model: Any) -> tuple[int, int, str]:
    """(low, high, where the vocabulary size came from) for random prompts (see the module docstring)."""
    vocab, source = _vocabulary(tokenizer, model)
    if vocab is None:
        raise ValueError(f"cannot tell the vocabulary size for random prompts; {_RANGE_HINT}")
    high = min(vocab - 1, TOKEN_HIGH_CAP)
    if high >= TOKEN_LOW:
        return TOKEN_LOW, high, source
    special = [int(t) for t in getattr(tokenizer, "all_special_ids", None) or [] if 0 <= int(t) < vocab // 2]
    low = max(vocab // 50, max(special) + 1 if special else 0)
    if high - low < 1:
        raise ValueError(f"the vocabulary of {vocab} tokens ({source}) leaves no random-token range; {_RANGE_HINT}")
    return low, high, f"{source} (small vocabulary: range scaled)"


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after a single text ([CLS], [SEP] for BERT).

    Read off the tokenizer itself: the encoding of a one-word text with and without special tokens.
    """
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise ValueError("frame_special=True needs the model's tokenizer (none was given or saved with the model)")
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens: {full} around {plain}")


def make_prompts(
    corpus: str | os.PathLike, tokenizer: Any, model: Any, token_range: tuple[int, int] | None
) -> tuple[Prompts, dict]:
    """The prompts of ``corpus`` ("random" or a text file) and what to record about them."""
    if isinstance(corpus, str) and corpus == "random":
        if token_range is not None:  # its form and order checked by check_lens_options
            low, high = (int(t) for t in token_range)
            vocab_from = "token_range"
            vocab, source = _model_vocabulary(tokenizer, model)
            if vocab is not None:
                check_token_range_fits((low, high), vocab, source)
        else:
            low, high, vocab_from = random_token_range(tokenizer, model)
        return Prompts(low, high, None, "random"), {"corpus": "random", "token_range": [low, high], "from": vocab_from}
    path = Path(corpus)  # an existing file (check_lens_options)
    if tokenizer is None:
        raise CorpusNeedsTokenizer(path)
    text = read_text(path, "corpus")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = np.asarray(ids, dtype=np.int64).reshape(-1)
    if stream.size == 0:
        raise ValueError(f"corpus {path} tokenises to no tokens")
    return Prompts(0, 0, stream, str(path)), {"corpus": str(path), "corpus_tokens": int(stream.size)}
