"""IMDb from a tiny aclImdb tree in the real layout, the word vocabulary, local HF tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from levyattn.data import (
    DataFormatError,
    SequenceClassificationDataset,
    collate_text,
    load_imdb,
    read_aclimdb_split,
)
from levyattn.data.tokenization import WordTokenizer

REVIEWS = {
    ("train", "pos"): {"10_9.txt": "A great film. Great acting!<br /><br />Loved it", "2_8.txt": "great fun"},
    ("train", "neg"): {"3_1.txt": "A terrible film, terrible plot.", "1_2.txt": "boring and bad"},
    ("test", "pos"): {"0_10.txt": "great zebra film", "5_7.txt": "fun fun fun"},
    ("test", "neg"): {"4_3.txt": "bad bad movie", "7_1.txt": "terrible"},
}


def write_aclimdb(root: Path) -> Path:
    base = root / "aclImdb"
    for (split, label), files in REVIEWS.items():
        d = base / split / label
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text, encoding="utf-8")
        (base / split / f"urls_{label}.txt").write_text("http://www.imdb.com/title/tt0000001/usercomments\n")
        (base / split / "labeledBow.feat").write_text("0:1 1:2\n")
    (base / "train" / "unsup").mkdir()
    (base / "train" / "unsup" / "0_0.txt").write_text("unlabelled review with words seen nowhere else: qwertyuiop")
    (base / "train" / "urls_unsup.txt").write_text("http://example\n")
    (base / "imdb.vocab").write_text("the\nand\n")
    (base / "README").write_text("Large Movie Review Dataset v1.0\n")
    return root


@pytest.fixture
def imdb_dir(tmp_path: Path) -> Path:
    return write_aclimdb(tmp_path)


def test_reads_pos_neg_only_in_id_order(imdb_dir):
    texts, labels = read_aclimdb_split(imdb_dir, "train")
    # negatives first (label 0), each folder in numeric id order; unsup and urls ignored
    assert labels == [0, 0, 1, 1]
    assert texts == [
        "boring and bad",
        "A terrible film, terrible plot.",
        "great fun",
        "A great film. Great acting!<br /><br />Loved it",
    ]
    # the aclImdb folder itself works as well as its parent
    assert read_aclimdb_split(imdb_dir / "aclImdb", "test")[1] == [0, 0, 1, 1]


def test_the_hub_copy_gives_the_same_data_as_the_folder(imdb_dir, hub_copy):
    splits = {s: dict(zip(("text", "label"), read_aclimdb_split(imdb_dir, s))) for s in ("train", "test")}
    asked = hub_copy(splits)
    from_hub = load_imdb(hub="someone/imdb", max_len=6)
    from_folder = load_imdb(imdb_dir, max_len=6)
    assert asked == [("someone/imdb", {"cache_dir": None})]
    for a, b in zip(from_hub, from_folder):
        assert [(x.tolist(), y) for x, y in a] == [(x.tolist(), y) for x, y in b]
    with pytest.raises(ValueError, match="give one of data_dir and hub"):
        load_imdb(imdb_dir, hub="someone/imdb")


def test_vocabulary_from_training_split_only(imdb_dir):
    train, test = load_imdb(imdb_dir, max_len=512)
    tok = train.tokenizer
    assert test.tokenizer is tok
    assert (tok.pad_id, tok.unk_id) == (0, 1)
    assert train.pad_id == 0 and train.num_classes == 2 and train.max_len == 512
    assert train.vocab_size == tok.vocab_size == len(tok.tokens)
    # "great" is the most frequent training word (3 times), so it gets the first free id
    assert tok.tokens[2] == "great"
    # words only in test or unsup never enter the vocabulary: they are <unk> (OOV)
    for w in ("zebra", "qwertyuiop", "movie"):
        assert w not in tok.tokens
    ids, label = test[2]  # test: neg 4_3, neg 7_1, pos 0_10 ("great zebra film"), pos 5_7
    assert label == 1
    assert ids.tolist() == [tok.token_to_id("great"), tok.unk_id, tok.token_to_id("film")]
    # <br /> is a space, not a word
    assert "br" not in tok.tokens and "<" not in tok.tokens


def test_vocab_size_and_min_freq_cap(imdb_dir):
    train, _ = load_imdb(imdb_dir, vocab_size=5)
    assert train.vocab_size == 5
    assert train.tokenizer.tokens[:2] == ["<pad>", "<unk>"]
    # by frequency: great (3), then the count-2 ties in alphabetical order: ".", a, film, terrible
    assert train.tokenizer.tokens[2:] == ["great", ".", "a"]
    train2, _ = load_imdb(imdb_dir, min_freq=2)
    assert set(train2.tokenizer.tokens[2:]) == {"great", ".", "a", "film", "terrible"}


def test_max_len_truncates_keeping_the_start(imdb_dir):
    train, _ = load_imdb(imdb_dir, max_len=3)
    full, _ = load_imdb(imdb_dir, max_len=512)
    assert train.max_len == 3
    for i in range(len(train)):
        assert len(train[i][0]) <= 3
        assert train[i][0].tolist() == full[i][0].tolist()[:3]


def test_collate_pads_and_masks(imdb_dir):
    train, _ = load_imdb(imdb_dir)
    ids, mask, labels = collate_text([train[i] for i in range(len(train))], pad_id=train.pad_id)
    lengths = [len(train[i][0]) for i in range(len(train))]
    assert ids.shape == mask.shape == (4, max(lengths))
    assert ids.dtype == torch.long and mask.dtype == torch.bool and labels.dtype == torch.long
    assert (~mask).sum(1).tolist() == lengths
    assert (ids[mask] == 0).all()
    assert labels.tolist() == [0, 0, 1, 1]


def test_saved_vocabulary_is_reused(imdb_dir, tmp_path):
    train, _ = load_imdb(imdb_dir)
    path = train.tokenizer.save(tmp_path / "vocab.json")
    again, _ = load_imdb(imdb_dir, tokenizer=path)
    assert isinstance(again.tokenizer, WordTokenizer)
    assert again.tokenizer.tokens == train.tokenizer.tokens
    assert all(again[i][0].equal(train[i][0]) for i in range(len(train)))


def test_local_huggingface_tokenizer(imdb_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "great": 2, "film": 3, "bad": 4}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    folder = tmp_path / "hf_tok"
    fast.save_pretrained(str(folder))
    train, test = load_imdb(imdb_dir, tokenizer=folder)
    assert train.vocab_size == 5 and train.pad_id == 0
    ids, _ = test[2]  # "great zebra film"
    assert ids.tolist() == [2, 1, 3]


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="IMDb data directory not found"):
        load_imdb(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not the aclImdb folder"):
        load_imdb(tmp_path / "empty")
    root = write_aclimdb(tmp_path / "a")
    bad = root / "aclImdb" / "test" / "neg" / "4_3.txt"
    bad.write_bytes(b"\xff\xfe broken")
    with pytest.raises(DataFormatError, match=r"4_3\.txt is not valid UTF-8"):
        load_imdb(root)
    bad.write_text("   \n")
    with pytest.raises(DataFormatError, match=r"4_3\.txt is empty"):
        load_imdb(root)
    root = write_aclimdb(tmp_path / "b")
    for f in (root / "aclImdb" / "train" / "pos").iterdir():
        f.unlink()
    with pytest.raises(DataFormatError, match=r"train/pos holds no review"):
        load_imdb(root)
    (root / "aclImdb" / "train" / "pos").rmdir()
    with pytest.raises(FileNotFoundError, match=r"train/pos"):
        load_imdb(root)


def test_bad_arguments(imdb_dir):
    with pytest.raises(ValueError, match="max_len"):
        load_imdb(imdb_dir, max_len=0)
    with pytest.raises(ValueError, match="split"):
        read_aclimdb_split(imdb_dir, "unsup")
    with pytest.raises(TypeError, match="tokenizer"):
        load_imdb(imdb_dir, tokenizer=42)


@pytest.mark.parametrize(
    ("sequences", "labels", "match"),
    [
        ([[1, 2], [3, 9]], [0, 1], r"sequence 1 has token ids 3\.\.9, outside 0\.\.vocab_size-1=8"),
        ([[1, 2], [-1, 2]], [0, 1], r"sequence 1 has token ids -1\.\.2"),
        ([[1, 2], [3, 4]], [0, 2], r"label 1 must be in 0\.\.1, got 2"),
        ([[1, 2], [3, 4]], [-1, 0], r"label 0 must be in 0\.\.1, got -1"),
        ([[1, 2], []], [0, 1], r"sequence 1 must be 1-D of length 1\.\.4 \(max_len\), got \(0,\)"),
        ([[1, 2, 3, 4, 5], [3]], [0, 1], r"sequence 0 must be 1-D of length 1\.\.4 \(max_len\), got \(5,\)"),
        ([[[1, 2]], [3]], [0, 1], r"sequence 0 must be 1-D"),
    ],
)
def test_sequence_dataset_refuses_items_a_model_cannot_take(sequences, labels, match):
    """An id past the embedding, a label past the classifier or a sequence longer than the
    positions is named with its index when the dataset is made, not met later in a batch."""
    with pytest.raises(ValueError, match=match):
        SequenceClassificationDataset(sequences, labels, vocab_size=9, num_classes=2, max_len=4)
    ok = SequenceClassificationDataset([[1, 8], [3, 4, 5, 6]], [0, 1], vocab_size=9, num_classes=2, max_len=4)
    assert len(ok) == 2
