"""Tokenizers: word, byte, SentencePiece (tiny corpora), saving and loading."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn.data import DataFormatError, load_tokenizer, train_tokenizer
from levyattn.data.tokenization import (
    CLASSIFIER_SPECIALS,
    ByteTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    basic_words,
)

CORPUS = [
    "A man in an orange hat starring at something.",
    "A Boston Terrier is running on lush green grass in front of a white fence.",
    "A girl in karate uniform breaking a stick with a front kick.",
    "Five people wearing winter jackets and helmets stand in the snow.",
    "People are fixing the roof of a house.",
]


def test_basic_words():
    assert basic_words("It's GREAT!<br />Really.") == ["it's", "great", "!", "really", "."]
    assert basic_words("Ab", lowercase=False) == ["Ab"]


def test_word_tokenizer_ids_oov_and_order_independence():
    tok = WordTokenizer.train(CORPUS)
    assert tok.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.tokens[4] == "a"  # the most frequent word
    ids = tok.encode("a man in a spaceship")
    assert ids[-1] == tok.unk_id and tok.unk_id not in ids[:-1]
    assert tok.decode(ids) == "a man in a"  # <unk> and other specials are dropped
    assert tok.decode([tok.bos_id, *tok.encode("people are fixing"), tok.eos_id, 0]) == "people are fixing"
    assert WordTokenizer.train(CORPUS[::-1]).tokens == tok.tokens
    small = WordTokenizer.train(CORPUS, vocab_size=6, specials=CLASSIFIER_SPECIALS)
    assert small.vocab_size == 6 and small.bos_id is None and small.unk_id == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="vocab_size"):
        WordTokenizer.train(CORPUS, vocab_size=4)
    with pytest.raises(ValueError, match="no text"):
        WordTokenizer.train([])
    with pytest.raises(ValueError, match="tokens\\[0\\]"):
        WordTokenizer(["a", "<pad>", "<unk>"])


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_sentencepiece_on_a_tiny_corpus(tmp_path, kind):
    tok = train_tokenizer(CORPUS, kind, vocab_size=8000)  # far more than 5 sentences support: a cap
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert 40 < tok.vocab_size < 8000
    for s in CORPUS:
        assert tok.decode(tok.encode(s)) == s
    path = tok.save(tmp_path / "spm.model")
    again = load_tokenizer(path)
    assert isinstance(again, SentencePieceTokenizer)
    assert [again.encode(s) for s in CORPUS] == [tok.encode(s) for s in CORPUS]
    # the same corpus gives the same model
    assert train_tokenizer(CORPUS, kind, vocab_size=8000).encode(CORPUS[1]) == tok.encode(CORPUS[1])


def test_sentencepiece_vocab_too_small_is_explained():
    with pytest.raises(ValueError, match=r"vocab_size=10 is too small .* at least \d+ pieces"):
        SentencePieceTokenizer.train(CORPUS, vocab_size=10)
    with pytest.raises(ValueError, match="no text"):
        SentencePieceTokenizer.train(["", "  "])


def test_save_load_dispatch(tmp_path):
    word = WordTokenizer.train(CORPUS)
    p = word.save(tmp_path / "w.json")
    assert json.loads(p.read_text())["type"] == "word"
    assert load_tokenizer(p).tokens == word.tokens
    # a byte-order mark (an editor's) is no reason to refuse the file
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert load_tokenizer(tmp_path / "bom.json").tokens == word.tokens
    (tmp_path / "truncated.json").write_text(p.read_text()[:20])
    with pytest.raises(DataFormatError, match="truncated.json is not valid JSON"):
        load_tokenizer(tmp_path / "truncated.json")
    b = ByteTokenizer().save(tmp_path / "b.json")
    assert isinstance(load_tokenizer(b), ByteTokenizer)
    (tmp_path / "bad.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(DataFormatError, match="bad.json: unknown type 'wordpiece'"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "numbers.json").write_text('{"type": "word", "tokens": ["<pad>", "<unk>", 3, null]}')
    with pytest.raises(DataFormatError, match=r"numbers.json: tokens must be strings, tokens\[2\] is 3"):
        load_tokenizer(tmp_path / "numbers.json")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(DataFormatError, match="junk.model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=40))
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["cat", "dog", "the", "sat", "on", "mat", "."]), min_size=1, max_size=12))
def test_word_tokenizer_round_trip_on_known_words(words):
    tok = WordTokenizer.train(["the cat sat on the mat . dog"])
    assert tok.decode(tok.encode(" ".join(words))) == " ".join(words)
