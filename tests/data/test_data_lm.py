"""Language-modelling blocks from text files."""

from __future__ import annotations

import gzip

import pytest
import torch

from levyattn.data import DataFormatError, LMBlockDataset, build_lm_data, collate_lm, load_text_files
from levyattn.data.tokenization import ByteTokenizer


def test_blocks_are_contiguous_and_shifted():
    tokens = torch.arange(23)
    ds = LMBlockDataset(tokens, 5, vocab_size=30)
    assert len(ds) == 4  # starts 0, 5, 10, 15 (each needs 6 tokens)
    x, y = ds[1]
    assert x.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [6, 7, 8, 9, 10]
    assert torch.equal(ds[-1][0], ds[3][0])
    overlapping = LMBlockDataset(tokens, 5, vocab_size=30, stride=2)
    assert len(overlapping) == 9 and overlapping[8][1].tolist() == [17, 18, 19, 20, 21]
    xb, yb = collate_lm([ds[0], ds[1]])
    assert xb.shape == yb.shape == (2, 5) and torch.equal(xb[:, 1:], yb[:, :-1])
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1"):
        LMBlockDataset(torch.arange(5), 5, vocab_size=30)
    with pytest.raises(ValueError, match="token ids must be in"):
        LMBlockDataset(torch.arange(10), 3, vocab_size=5)


def test_text_files_plain_gz_and_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world, " * 20)
    (tmp_path / "docs" / "b.txt.gz").write_bytes(gzip.compress(("goodbye moon. " * 20).encode()))
    (tmp_path / "docs" / "ignored.csv").write_text("x,y")
    data = load_text_files(tmp_path / "docs", block_size=16, val_fraction=0.5)
    assert isinstance(data.tokenizer, ByteTokenizer)
    assert data.info["files"] == 2
    # one document each side of the split, ending with EOS
    train_stream = data.train.tokens.tolist()
    assert data.tokenizer.decode(train_stream) == "hello world, " * 20
    assert train_stream[-1] == data.tokenizer.eos_id
    assert data.tokenizer.decode(data.valid.tokens.tolist()) == "goodbye moon. " * 20
    x, y = data.train[0]
    assert x.shape == y.shape == (16,)


def test_trained_tokenizer_sees_training_text_only(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("the cat sat on the mat\n" * 10)
    valid = tmp_path / "valid.txt"
    valid.write_text("the dog sat on the log\n" * 10)
    data = load_text_files(train, valid_paths=valid, tokenizer="word", block_size=4)
    assert "dog" not in data.tokenizer.tokens
    assert data.tokenizer.unk_id in data.valid.tokens.tolist()


def test_single_document_split_and_errors(tmp_path):
    data = build_lm_data(["abcdefghij" * 10], block_size=8, val_fraction=0.2)
    assert data.info == {"train_tokens": 81, "valid_tokens": 21}  # 80/20 characters + EOS each
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataFormatError, match="empty.txt is empty"):
        load_text_files(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_files(tmp_path / "missing.txt")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.txt"):
        load_text_files(tmp_path / "e")
    with pytest.raises(ValueError, match="val_fraction"):
        build_lm_data(["abc"], val_fraction=1.0)
