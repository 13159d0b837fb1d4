"""Multi30K files (plain and gzipped), bad parallel files, the translation datasets and
collate, saved tokenizers, and the toy grammar with long-range agreement."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from levyattn.data import DataFormatError, translation
from levyattn.data.tokenization import WordTokenizer

EN = [
    "Two young, White males are outside near many bushes.",
    "Several men in hard hats are operating a giant pulley system.",
    "A little girl climbing into a wooden playhouse.",
    "A man in a blue shirt is standing on a ladder cleaning windows.",
]
DE = [
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "Ein Mann in einem blauen Hemd steht auf einer Leiter und putzt Fenster.",
]


def write_multi30k(root: Path, gz: bool = False, layout: str = "") -> Path:
    d = root / layout if layout else root
    d.mkdir(parents=True, exist_ok=True)
    for name, sl in (("train", slice(0, 4)), ("val", slice(1, 3)), ("test_2016_flickr", slice(2, 4))):
        for lang, lines in (("en", EN), ("de", DE)):
            text = "\n".join(lines[sl]) + "\n"
            if gz:
                (d / f"{name}.{lang}.gz").write_bytes(gzip.compress(text.encode()))
            else:
                (d / f"{name}.{lang}").write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_reads_the_standard_files(tmp_path, gz):
    write_multi30k(tmp_path, gz=gz)
    splits = translation.read_multi30k(tmp_path)
    assert splits["train"] == (EN, DE)
    assert splits["valid"] == (EN[1:3], DE[1:3])
    assert splits["test"] == (EN[2:4], DE[2:4])
    assert translation.read_multi30k(tmp_path, "de", "en", splits=("valid",))["valid"] == (DE[1:3], EN[1:3])


def test_dataset_repository_layout(tmp_path):
    write_multi30k(tmp_path, gz=True, layout="data/task1/raw")
    assert translation.read_multi30k(tmp_path)["train"][0] == EN


@pytest.mark.parametrize("tokenizer", ["word", "sentencepiece"])
def test_items_collate_and_saved_tokenizers(tmp_path, tokenizer):
    write_multi30k(tmp_path / "m")
    data = translation.load_multi30k(tmp_path / "m", tokenizer=tokenizer, vocab_size=200, max_len=12)
    assert data.joint and len(data.train) == 4 and len(data.valid) == 2 and len(data.test) == 2
    tok = data.tgt_tokenizer
    src, tgt = data.train[0]
    assert src[-1] == tok.eos_id and tok.bos_id not in src.tolist()
    assert tgt[0] == tok.bos_id and tgt[-1] == tok.eos_id
    assert len(src) <= 12 and len(tgt) <= 12
    assert data.test.tgt_text == DE[2:4]
    cfg = data.model_config()
    assert (cfg["pad_id"], cfg["bos_id"], cfg["eos_id"], cfg["max_len"]) == (0, 1, 2, 12)
    # a short sentence decodes back (word tokenisation keeps case and splits punctuation)
    short = translation.load_multi30k(tmp_path / "m", tokenizer=tokenizer, vocab_size=200, max_len=64)
    s2, t2 = short.test[0]
    want = DE[2] if tokenizer == "sentencepiece" else "Ein kleines Mädchen klettert in ein Spielhaus aus Holz ."
    assert tok.decode(t2.tolist()) == want
    batch_src, batch_tgt = translation.collate_translation([short.train[i] for i in range(4)], pad_id=0)
    assert batch_src.shape[0] == batch_tgt.shape[0] == 4 and batch_src.dtype == torch.long
    lengths = [len(short.train[i][1]) for i in range(4)]
    assert (batch_tgt != 0).sum(1).tolist() == lengths
    # tokenizers saved next to a model come back identical
    data.save_tokenizers(tmp_path / "run")
    s_tok, t_tok = translation.load_translation_tokenizers(tmp_path / "run")
    assert t_tok.encode(DE[0]) == tok.encode(DE[0]) and s_tok.encode(EN[0]) == data.src_tokenizer.encode(EN[0])
    again = translation.load_multi30k(tmp_path / "m", tokenizer=tmp_path / "run", max_len=12)
    assert torch.equal(again.train[1][1], data.train[1][1])


def test_separate_vocabularies(tmp_path):
    write_multi30k(tmp_path)
    data = translation.load_multi30k(tmp_path, tokenizer="word", joint=False)
    assert not data.joint
    assert "Männer" in data.tgt_tokenizer.tokens and "Männer" not in data.src_tokenizer.tokens


@pytest.mark.parametrize("special", ["<bos>", "<eos>"])
def test_separate_tokenizers_must_share_their_special_ids(special):
    # The source ends with the one eos_id: with the target's eos at another id it would be a
    # different token of the source vocabulary.
    source = WordTokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"])
    target_tokens = ["<pad>", "<bos>", "<eos>", "<unk>", "ein", "hund"]
    moved = target_tokens.index(special)
    target_tokens[moved], target_tokens[-1] = target_tokens[-1], target_tokens[moved]
    name = {"<bos>": "bos_id", "<eos>": "eos_id"}[special]
    with pytest.raises(ValueError, match=f"must share the {name}, got {moved} and 5"):
        translation.encode_pairs(["a dog"], ["ein hund"], source, WordTokenizer(target_tokens), max_len=10)
    data = translation.encode_pairs(["a dog"], ["ein hund"], source, WordTokenizer(source.tokens), max_len=10)
    assert data[0][0].tolist() == [4, 5, source.eos_id]


def test_the_hub_copy_gives_the_same_data_as_the_files(tmp_path, hub_copy):
    write_multi30k(tmp_path)
    rows = {"train": slice(0, 4), "validation": slice(1, 3), "test": slice(2, 4)}
    asked = hub_copy({split: {"en": EN[sl], "de": [f" {t} " for t in DE[sl]]} for split, sl in rows.items()})
    from_hub = translation.load_multi30k(hub="someone/multi30k", tokenizer="word", cache_dir=tmp_path / "cache")
    from_files = translation.load_multi30k(tmp_path, tokenizer="word")
    assert asked == [("someone/multi30k", {"cache_dir": str(tmp_path / "cache")})]
    assert from_hub.info["dataset"] == "someone/multi30k" and from_files.info["dataset"] == "multi30k"
    for split in ("train", "valid", "test"):
        a, b = getattr(from_hub, split), getattr(from_files, split)
        assert a.tgt_text == b.tgt_text and [x[1].tolist() for x in a] == [x[1].tolist() for x in b]
    with pytest.raises(ValueError, match="give one of data_dir and hub"):
        translation.load_multi30k(tmp_path, hub="someone/multi30k")
    with pytest.raises(ValueError, match="give one of data_dir and hub"):
        translation.load_multi30k()


def test_bad_parallel_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Multi30K data directory not found"):
        translation.read_multi30k(tmp_path / "none")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.en\[\.gz\]"):
        translation.read_multi30k(tmp_path / "x")
    root = write_multi30k(tmp_path / "a")
    (root / "val.de").write_text("\n".join(DE[1:4]) + "\n")
    with pytest.raises(DataFormatError, match=r"val\.en has 2 lines, .*val\.de has 3"):
        translation.read_multi30k(root)
    root = write_multi30k(tmp_path / "b")
    (root / "train.en").write_text("")
    with pytest.raises(DataFormatError, match=r"train\.en is empty"):
        translation.read_multi30k(root)
    (root / "train.en").write_text(EN[0] + "\n\n" + EN[2] + "\n" + EN[3] + "\n")
    with pytest.raises(DataFormatError, match=r"train\.en: line 2 is empty"):
        translation.read_multi30k(root)
    root = write_multi30k(tmp_path / "c", gz=True)
    (root / "test_2016_flickr.de.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"test file not found .*test_2016_flickr\.de\[\.gz\]"):
        translation.read_multi30k(root)
    root = write_multi30k(tmp_path / "d", gz=True)
    (root / "train.de.gz").write_bytes(gzip.compress(b"\xff\xfe\xfa"))
    with pytest.raises(DataFormatError, match=r"train\.de\.gz is not valid UTF-8"):
        translation.read_multi30k(root)


def test_pairs_stay_aligned_with_unicode_line_separators_and_a_bom(tmp_path):
    """U+2028 / U+0085 inside a sentence are no line ends (str.splitlines() cut there and
    shifted every later pair); a UTF-8 byte-order mark is not part of the first word."""
    en = [EN[0], "A man\u2028with a hat.", EN[2], "Dogs\x85run."]
    root = write_multi30k(tmp_path)
    (root / "train.en").write_bytes(("\ufeff" + "\n".join(en) + "\n").encode("utf-8"))
    (root / "train.de").write_bytes(("\ufeff" + "\r\n".join(DE) + "\r\n").encode("utf-8"))
    src, tgt = translation.read_multi30k(root, splits=("train",))["train"]
    assert src == en and tgt == DE
    assert src[0].split()[0] == "Two"


# -- toy grammar ------------------------------------------------------------------------------


def test_toy_translation_is_deterministic():
    a = translation.make_toy_translation(50, seed=3)
    assert a == translation.make_toy_translation(50, seed=3)
    assert a[:20] == translation.make_toy_translation(20, seed=3)
    assert a != translation.make_toy_translation(50, seed=4)
    # pinned: anyone regenerating seed 0 gets this first pair
    assert translation.make_toy_translation(1, seed=0)[0] == (
        "the new tree under the old woman with the new women with the green women under the fast cars is old .",
        "der neuer baum unter der alte frau mit den neuen frauen mit den gruenen frauen unter den schnellen "
        "autos ist alter .",
    )


def test_toy_agreement_is_long_range():
    nouns = translation.TOY_NOUNS
    gender = {t_sg: g for _, _, t_sg, _, g in nouns} | {t_pl: "pl" for _, _, _, t_pl, _ in nouns}
    pairs = translation.make_toy_translation(300, seed=1, min_pp=2, max_pp=3)
    mismatched_distractor = 0
    for src, tgt in pairs:
        s, t = src.split(), tgt.split()
        assert len(s) == len(t)  # word-for-word alignment
        subject = t[2] if t[2] in gender else t[1]
        verb = t.index("ist") if "ist" in t else t.index("sind")
        pred = t[verb + 1]
        assert pred.endswith(translation.TOY_SUFFIX[gender[subject]])
        assert verb - t.index(subject) >= 3 * 2 + 1  # at least two PPs between subject and verb
        last_pp_noun = t[verb - 1]
        mismatched_distractor += gender[last_pp_noun] != gender[subject]
    # the nearest noun usually disagrees with the subject: copying its agreement fails
    assert mismatched_distractor > 0.5 * len(pairs)


def test_toy_agreement_accuracy_scores_the_suffix():
    refs = [t for _, t in translation.make_toy_translation(40, seed=2)]
    assert translation.toy_agreement_accuracy(refs, refs) == 1.0
    swapped = []
    for r in refs:
        w = r.split()
        i = w.index("ist") + 1 if "ist" in w else w.index("sind") + 1
        stem = next(s for _, s in translation.TOY_ADJECTIVES if w[i].startswith(s))
        wrong = "en" if not w[i].endswith("en") else "er"
        w[i] = stem + wrong
        swapped.append(" ".join(w))
    assert translation.toy_agreement_accuracy(swapped, refs) == 0.0
    assert translation.toy_agreement_accuracy(["garbage"] * len(refs), refs) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        translation.toy_agreement_accuracy(refs[:3], refs)


def test_toy_datasets_and_fixed_vocabulary():
    data = translation.load_toy_translation(30, 5, 5, seed=0, max_pp=2)
    tok = translation.toy_tokenizer()
    assert data.src_tokenizer.tokens == tok.tokens
    for i in range(len(data.train)):
        src, tgt = data.train[i]
        assert tok.unk_id not in src.tolist() and tok.unk_id not in tgt.tolist()
    assert data.train.src_text[0] != data.test.src_text[0]
    with pytest.raises(ValueError, match="max_pp"):
        translation.make_toy_translation(3, max_pp=0, min_pp=1)
