"""Tokenizers with one interface: word-level, byte-level, SentencePiece subwords and any
Hugging Face tokenizer saved in a local folder.

Every tokenizer here has

- ``encode(text) -> list[int]`` (never adds BOS/EOS: the datasets add them where the
  task needs them) and ``decode(ids) -> str`` (skips the special ids);
- ``vocab_size``, ``pad_id``, ``unk_id`` and ``bos_id`` / ``eos_id`` (``None`` when the
  tokenizer has none);
- ``save(path)`` (atomic) and a class method ``load(path)``; :func:`load_tokenizer`
  reads any of them back by looking at the file.

Special ids: the word tokenizer of a classifier is ``<pad>=0, <unk>=1``; every
tokenizer with BOS/EOS (translation, language models) is ``<pad>=0, <bos>=1, <eos>=2,
<unk>=3``, the defaults of :class:`levyattn.models.seq2seq.Seq2SeqConfig`.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from levyattn._extras import require
from levyattn.data._common import DataFormatError, PathLike, check_choice, check_int, require_dir
from levyattn.io import atomic_write_bytes, atomic_write_json, read_json

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
CLASSIFIER_SPECIALS = (PAD, UNK)
SEQ2SEQ_SPECIALS = (PAD, BOS, EOS, UNK)

# Words and single punctuation marks; IMDb's HTML line breaks are spaces.
_WORD_RE = re.compile(r"[\w']+|[^\w\s]", re.UNICODE)
_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)


def basic_words(text: str, lowercase: bool = True) -> list[str]:
    """Split text into words and punctuation marks (``"It's great!"`` -> ``["it's", "great", "!"]``).

    ``<br />`` tags become spaces; with ``lowercase`` the text is lower-cased first.
    """
    text = _BR_RE.sub(" ", text)
    if lowercase:
        text = text.lower()
    return _WORD_RE.findall(text)


@runtime_checkable
class Tokenizer(Protocol):
    """What the datasets and models need from a tokenizer."""

    vocab_size: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: PathLike) -> Any: ...


def _ids_list(ids: Iterable[int] | Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class WordTokenizer:
    """A word-level vocabulary: words and punctuation (:func:`basic_words`), no training library.

    ``tokens[i]`` is the word of id ``i``; ``tokens[0]`` must be ``<pad>`` and ``<unk>``
    must be present (out-of-vocabulary words map to it). ``<bos>`` / ``<eos>`` are used
    when present. ``decode`` joins words with spaces (word splitting is lossy: ``"it's!"``
    decodes as ``"it's !"``).
    """

    kind = "word"

    def __init__(self, tokens: Sequence[str], *, lowercase: bool = True) -> None:
        tokens = list(tokens)
        bad = next((i for i, t in enumerate(tokens) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"tokens must be strings, tokens[{bad}] is {tokens[bad]!r}")
        if not tokens or tokens[0] != PAD:
            raise ValueError(f"tokens[0] must be {PAD!r}, got {tokens[:1]!r}")
        if UNK not in tokens:
            raise ValueError(f"tokens must contain {UNK!r}")
        if len(set(tokens)) != len(tokens):
            dup = [t for t, c in Counter(tokens).items() if c > 1][:5]
            raise ValueError(f"tokens must be distinct, repeated: {dup}")
        self.tokens = tokens
        self.lowercase = bool(lowercase)
        self._index = {t: i for i, t in enumerate(tokens)}
        self.pad_id = 0
        self.unk_id = self._index[UNK]
        self.bos_id = self._index.get(BOS)
        self.eos_id = self._index.get(EOS)
        self._special = {i for i in (self.pad_id, self.unk_id, self.bos_id, self.eos_id) if i is not None}

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int | None = None,
        min_freq: int = 1,
        specials: Sequence[str] = SEQ2SEQ_SPECIALS,
        lowercase: bool = True,
    ) -> WordTokenizer:
        """Build the vocabulary from ``texts`` (the training split only).

        Keeps the words seen at least ``min_freq`` times, most frequent first (ties in
        alphabetical order, so the result does not depend on the order of the texts),
        up to ``vocab_size`` ids in all, specials included (``None``: no cap).
        ``specials``: :data:`CLASSIFIER_SPECIALS` (pad, unk) or :data:`SEQ2SEQ_SPECIALS`
        (pad, bos, eos, unk).
        """
        specials = list(specials)
        if not specials or specials[0] != PAD or UNK not in specials:
            raise ValueError(f"specials must start with {PAD!r} and contain {UNK!r}, got {specials}")
        min_freq = check_int("min_freq", min_freq, 1)
        if vocab_size is not None:
            vocab_size = check_int("vocab_size", vocab_size, len(specials) + 1)
        counts: Counter[str] = Counter()
        n_texts = 0
        for text in texts:
            counts.update(basic_words(text, lowercase))
            n_texts += 1
        if n_texts == 0 or not counts:
            raise ValueError("cannot build a vocabulary from no text (the training texts are empty)")
        kept = (w for w, c in counts.items() if c >= min_freq and w not in specials)
        words = sorted(kept, key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            words = words[: vocab_size - len(specials)]
        return cls(specials + words, lowercase=lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str) -> int:
        return self._index.get(token, self.unk_id)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text``; unknown words are ``unk_id``. No BOS/EOS."""
        get, unk = self._index.get, self.unk_id
        return [get(w, unk) for w in basic_words(text, self.lowercase)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined with spaces, special ids left out (out-of-range ids raise)."""
        out = []
        for i in _ids_list(ids):
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"id {i} is outside the vocabulary [0, {len(self.tokens) - 1}]")
            if i not in self._special:
                out.append(self.tokens[i])
        return " ".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "lowercase": self.lowercase, "tokens": self.tokens}

    def save(self, path: PathLike) -> Path:
        """Write the vocabulary as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict(), indent=0)

    @classmethod
    def load(cls, path: PathLike) -> WordTokenizer:
        p = Path(path)
        data = read_json(p, "word tokenizer file")
        if not isinstance(data, dict) or data.get("type") != cls.kind or not isinstance(data.get("tokens"), list):
            raise DataFormatError(f"word tokenizer file {p} lacks type='word' and a 'tokens' list")
        try:
            return cls(data["tokens"], lowercase=bool(data.get("lowercase", True)))
        except (TypeError, ValueError) as err:
            raise DataFormatError(f"word tokenizer file {p}: {err}") from err

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


class ByteTokenizer:
    """UTF-8 bytes as tokens: nothing to train, nothing out of vocabulary.

    ids: ``<pad>=0, <bos>=1, <eos>=2, <unk>=3`` (never produced), byte ``b`` is ``b + 4``;
    ``vocab_size`` 260. ``decode`` replaces invalid UTF-8 (e.g. a sampled partial
    character) with U+FFFD.
    """

    kind = "byte"
    offset = 4

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = 256 + self.offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytearray()
        for i in _ids_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size - 1}]")
            if i >= self.offset:
                data.append(i - self.offset)
        return data.decode("utf-8", errors="replace")

    def save(self, path: PathLike) -> Path:
        return atomic_write_json(path, {"type": self.kind})

    @classmethod
    def load(cls, path: PathLike) -> ByteTokenizer:
        return cls()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_SPM_SIZE_RE = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class SentencePieceTokenizer:
    """SentencePiece subwords (unigram or BPE), trained on the training split.

    ids: ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``. ``save`` writes SentencePiece's own
    ``.model`` file, so ``spm_encode`` and ``sentencepiece.SentencePieceProcessor`` read it too.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        require("translate", "sentencepiece", purpose="a SentencePiece tokenizer")
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError by version
            raise DataFormatError(f"not a SentencePiece model: {err}") from err
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            int(self._sp.pad_id()), int(self._sp.bos_id()), int(self._sp.eos_id()), int(self._sp.unk_id()),
        )  # fmt: skip
        if self.pad_id < 0:
            raise DataFormatError("the SentencePiece model has no padding piece (train it with pad_id=0)")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 8000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        num_threads: int = 1,
    ) -> SentencePieceTokenizer:
        """Train on ``texts`` (one sentence each; the training split only).

        ``vocab_size`` is an upper bound (SentencePiece's ``hard_vocab_limit=False``): a
        tiny corpus yields fewer pieces instead of failing. It must still cover every
        distinct character plus the 4 special pieces; a smaller value raises ValueError
        saying the least size that works. One thread by default: the same corpus always
        gives the same model.
        """
        require("translate", "sentencepiece", purpose="training a SentencePiece tokenizer")
        import sentencepiece as spm

        vocab_size = check_int("vocab_size", vocab_size, 5)
        check_choice("model_type", model_type, ("unigram", "bpe", "char", "word"))
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("cannot train SentencePiece on no text (the training texts are empty)")
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK, hard_vocab_limit=False,
                num_threads=check_int("num_threads", num_threads, 1), minloglevel=2,
                # keep every sentence: the default samples long corpora, which changes the model
                input_sentence_size=0, shuffle_input_sentence=False,
            )  # fmt: skip
        except RuntimeError as err:
            m = _SPM_SIZE_RE.search(str(err))
            if m:
                raise ValueError(
                    f"vocab_size={vocab_size} is too small for this corpus: SentencePiece needs at least "
                    f"{m.group(2)} pieces (its distinct characters plus 4 special pieces)"
                ) from err
            raise ValueError(f"SentencePiece training failed: {err}") from err
        return cls(buf.getvalue())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        ids = _ids_list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size - 1}]")
        return self._sp.decode([i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, path: PathLike) -> Path:
        """Write the ``.model`` file (atomically)."""
        return atomic_write_bytes(path, self._proto)

    @classmethod
    def load(cls, path: PathLike) -> SentencePieceTokenizer:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {p}")
        try:
            return cls(p.read_bytes())
        except DataFormatError as err:
            raise DataFormatError(f"SentencePiece model file {p}: {err}") from err

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """Any Hugging Face tokenizer saved in a local folder (``save_pretrained``), read with
    ``AutoTokenizer.from_pretrained(path, local_files_only=True)``: nothing is downloaded.

    ``encode`` adds no special tokens. ``pad_id`` is the tokenizer's pad token, or its
    EOS token, or 0 when it has neither (GPT-2 style): padding is always also given by
    the mask, so the choice only fills the padded slots. ``save(path)`` writes a folder.
    """

    kind = "huggingface"

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.vocab_size = int(len(tokenizer))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.unk_id = tokenizer.unk_token_id

    @classmethod
    def load(cls, path: PathLike) -> HFTokenizer:
        p = require_dir(path, "Hugging Face tokenizer folder")
        require("hf", "transformers", purpose=f"loading the tokenizer folder {p}")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataFormatError(f"{p} is not a loadable Hugging Face tokenizer folder: {err}") from err
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(_ids_list(ids), skip_special_tokens=True)

    def save(self, path: PathLike) -> Path:
        self.tok.save_pretrained(str(path))
        return Path(path)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tok).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(path: PathLike) -> WordTokenizer | ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
    """Read back any tokenizer of this module: a folder is a Hugging Face tokenizer, a JSON
    file a word or byte tokenizer, anything else a SentencePiece ``.model`` file."""
    p = Path(path).expanduser()
    if p.is_dir():
        return HFTokenizer.load(p)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    head = p.read_bytes()[:64].removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"{"):
        data = read_json(p, "tokenizer file")
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == ByteTokenizer.kind:
            return ByteTokenizer()
        if kind == WordTokenizer.kind:
            return WordTokenizer.load(p)
        raise DataFormatError(f"tokenizer file {p}: unknown type {kind!r} (expected 'word' or 'byte')")
    return SentencePieceTokenizer.load(p)


def train_tokenizer(
    texts: Sequence[str], kind: str = "sentencepiece", *, vocab_size: int = 8000, min_freq: int = 1, **kwargs: Any
) -> WordTokenizer | ByteTokenizer | SentencePieceTokenizer:
    """A tokenizer of ``kind`` ("sentencepiece", "bpe" (SentencePiece BPE), "word" or "byte")
    trained on ``texts``; ``vocab_size`` is the cap (ignored by "byte")."""
    check_choice("kind", kind, ("sentencepiece", "bpe", "word", "byte"))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer.train(texts, vocab_size=vocab_size, min_freq=min_freq, **kwargs)
    model_type = "bpe" if kind == "bpe" else kwargs.pop("model_type", "unigram")
    return SentencePieceTokenizer.train(texts, vocab_size=vocab_size, model_type=model_type, **kwargs)
