"""examples/finetune_hf_encoder.py runs end to end on a local encoder and saves an FNA model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_hf_encoder.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_hf_encoder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _local_encoder(folder: Path) -> None:
    """A tiny random BERT and a word-level tokenizer, saved as a pretrained model folder."""
    words = "[PAD] [UNK] [CLS] [SEP] good bad film plot the very".split()
    vocab = {w: i for i, w in enumerate(words)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, pad_token_id=0,
    )
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_the_saved_model_is_fna(tmp_path):
    # to_fna on the encoder gives it its own config copy: the classifier's config, which
    # save_pretrained writes, must be the converted one (it was not: the run stopped on an assertion)
    _local_encoder(tmp_path / "encoder")
    rows = ["text,label"] + [f"the very {w} film,{w}" for w in ("good", "bad") * 4]
    for name in ("train.csv", "eval.csv"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    args = ["--model", str(tmp_path / "encoder"), "--train", str(tmp_path / "train.csv")]
    args += ["--eval", str(tmp_path / "eval.csv"), "--epochs", "1", "--calibration-size", "4"]
    assert _load_example().main([*args, "--out", str(tmp_path / "out")]) == 0

    saved = tmp_path / "out" / "fna-model"
    config = json.loads((saved / "config.json").read_text())
    assert len(config["fna_bandwidth"]) == 2  # one calibrated bandwidth per layer
    model = transformers.AutoModelForSequenceClassification.from_pretrained(saved, attn_implementation="fna")
    assert model.config._attn_implementation == "fna" and model.config.fna_bandwidth == config["fna_bandwidth"]
