"""``levyattn analyze`` on a translation model's checkpoint: its encoder's self-attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from levyattn.analysis import spectral_gap
from levyattn.cli import main
from levyattn.models import Seq2SeqConfig, Seq2SeqTransformer
from levyattn.training.checkpoint import save_checkpoint


def test_analyze_reads_the_encoder_attention_with_padding(tmp_path):
    torch.manual_seed(0)
    config = Seq2SeqConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=8, num_heads=2, num_encoder_layers=2,
                           num_decoder_layers=1, max_len=16)  # fmt: skip
    model = Seq2SeqTransformer(config).eval()
    save_checkpoint(tmp_path / "run", model=model, model_type="seq2seq", model_config=config.to_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])  # pad_id 0 ends row 1
    np.save(tmp_path / "ids.npy", ids.numpy())
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "run"), "--input", str(tmp_path / "ids.npy"), "--out", str(out),
                 "--no-paths"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert {r["layer"] for r in summary["records"]} == {"encoder0", "encoder1"}
    with torch.no_grad():
        # The encoder's attention does not depend on the target.
        weights = model(ids, ids[:, :1], output_attentions=True).encoder_attentions
    for rec in summary["records"]:
        assert rec["n_valid"] == (6 if rec["batch"] == 0 else 4)
        if rec["batch"] == 0:
            w = weights[int(rec["layer"][-1])][0, rec["head"]].double()
            assert rec["spectral_gap"] == pytest.approx(float(spectral_gap(w)), abs=1e-6)


def test_a_source_sentence_is_analysed_as_translation_reads_it(tmp_path):
    """A sentence was encoded without the EOS that training and translation end every source
    with, so the analysed matrices (5 tokens for "a cat") were not the encoder's attention
    when it translates that sentence (6 tokens; head 0's gap 0.983 instead of 0.968)."""
    from levyattn.data.tokenization import ByteTokenizer
    from levyattn.training.tasks.tokenized import TOKENIZER_NAME

    torch.manual_seed(0)
    config = Seq2SeqConfig(src_vocab_size=260, tgt_vocab_size=260, d_model=16, num_heads=2, num_encoder_layers=1,
                           num_decoder_layers=1, max_len=32)  # fmt: skip
    model = Seq2SeqTransformer(config).eval()
    save_checkpoint(tmp_path / "run", model=model, model_type="seq2seq", model_config=config.to_dict())
    tokenizer = ByteTokenizer()
    tokenizer.save(tmp_path / "run" / TOKENIZER_NAME)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "run"), "--input", "a cat", "--out", str(out), "--no-paths"]) == 0
    records = json.loads((out / "summary.json").read_text())["records"]
    src = torch.tensor([tokenizer.encode("a cat") + [tokenizer.eos_id]])
    with torch.no_grad():
        weights = model(src, src[:, :1], output_attentions=True).encoder_attentions[0][0].double()
    for rec in records:
        assert rec["n_valid"] == 6
        assert rec["spectral_gap"] == pytest.approx(float(spectral_gap(weights[rec["head"]])), abs=1e-9)
