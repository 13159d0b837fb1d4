"""measure_decay on the exact power-law stand-in, random-weight GPT-2 / Llama / BERT / BLOOM, files, bad input."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DIST, make_tokenizer

from levyattn.lens import DenseOptions, analyze_decay, measure_decay
from levyattn.lens.prompts import Prompts
from levyattn.lens.synthetic import PowerLawAttentionModel


@pytest.mark.parametrize("protocol", ["published", "dense"])
def test_standin_gamma_recovered(protocol):
    m = PowerLawAttentionModel(gamma=0.73, n_layers=2, n_heads=2, max_positions=2100)
    meas = measure_decay(m, protocol=protocol, n_prompts=2, seeds=(42,), batch_size=2)
    assert meas.distances.tolist() == [10, 20, 30, 50, 100, 200, 500, 1000, 2000]  # the published grid fits
    res = analyze_decay(meas, n_boot=50)
    assert abs(res.power.gamma - 0.73) < 0.01
    assert res.power.r2 > 0.9999 and res.choice.choice == "power_law"
    assert res.reading.regime == "smoothing" and not res.reading.levy_valid


def test_standin_per_head_gamma_and_bidirectional():
    gammas = np.array([[0.6, 1.4], [1.0, 2.2]])
    m = PowerLawAttentionModel(gamma=gammas, max_positions=400, causal=False)
    meas = measure_decay(m, protocol="dense", distances=[30, 60, 120, 240], n_prompts=2, seeds=(42,))
    assert not meas.causal and meas.info["dense"]["direction_used"] == "both"
    res = analyze_decay(meas, n_boot=50)
    np.testing.assert_allclose(res.head_gamma, gammas, atol=0.01)
    assert res.head_gamma.shape == (2, 2) and res.layer_gamma.shape == (2,)


def test_standin_noise_ci_covers_truth():
    m = PowerLawAttentionModel(gamma=1.2, max_positions=400, noise=0.5)
    meas = measure_decay(m, distances=[30, 60, 120, 240], n_prompts=24, seeds=(42, 123))
    res = analyze_decay(meas, n_boot=300)
    lo, hi = res.gamma_ci
    assert lo < hi and lo < 1.2 + 0.01 and hi > 1.2 - 0.01 and abs(res.power.gamma - 1.2) < 0.02
    assert meas.prompt_values.shape == (2, 24, 4) and meas.sample_counts.tolist() == [48] * 4


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_one_pass_equals_per_distance(name, request):
    model = request.getfixturevalue(name)
    kw = dict(distances=DIST, n_prompts=2, seeds=(42, 7), batch_size=2)
    one = measure_decay(model, passes="one", **kw)
    per = measure_decay(model, passes="per_distance", **kw)
    assert one.passes == "one" and per.passes == "per_distance" and one.causal
    assert one.n_passes == 2 and per.n_passes == 2 * len(DIST)
    rel = np.abs(one.prompt_layer - per.prompt_layer) / np.abs(per.prompt_layer)
    assert rel.max() <= 1e-5
    np.testing.assert_allclose(one.layer_head, per.layer_head, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the run, then restored


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_task_head_not_run_and_weights_unchanged(name, request):
    model = request.getfixturevalue(name)
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    kw = dict(distances=[30, 60, 120], n_prompts=2, seeds=(42,), batch_size=2, causal=True)
    impl = model.config._attn_implementation
    try:
        lens = measure_decay(model, capture="eager", **kw)  # the same eager weights as the whole model's
        assert calls == [] and lens.info["forward_module"] == type(model.base_model).__name__
        model.set_attn_implementation("eager")

        def full_model(ids):  # the whole model, head and logits included
            return model(input_ids=ids, output_attentions=True, use_cache=False).attentions

        full = measure_decay(attentions_fn=full_model, token_range=(1000, 1999), **kw)
    finally:
        hook.remove()
        model.set_attn_implementation(impl)
    assert len(calls) == 1 and full.info["forward_module"] == "attentions_fn"  # the hook does fire on the head
    np.testing.assert_allclose(lens.prompt_layer, full.prompt_layer, rtol=1e-6)


def test_published_prompt_stream_reproduces_published_ids():
    p = Prompts(1000, 1999, None, "random")
    rng = random.Random(42)
    expected = [[rng.randint(1000, 1999) for _ in range(60)] for _ in range(2)]
    assert p.draw(42, 2, 60).tolist() == expected


def test_published_stream_matches_nested_on_first_prompt(gpt2):
    kw = dict(distances=[30, 60], n_prompts=2, seeds=(42,), passes="per_distance")
    pub = measure_decay(gpt2, prompt_stream="published", **kw)
    nest = measure_decay(gpt2, **kw)
    assert not pub.paired and nest.paired
    np.testing.assert_allclose(pub.prompt_layer[:, 0], nest.prompt_layer[:, 0], rtol=1e-5)  # same ids
    # at the longest distance both streams draw the same prompts; at d = 30 prompt 1 differs
    np.testing.assert_allclose(pub.prompt_layer[:, :, :, 1], nest.prompt_layer[:, :, :, 1], rtol=1e-5)
    assert not np.allclose(pub.prompt_layer[:, 1, :, 0], nest.prompt_layer[:, 1, :, 0])
    with pytest.raises(ValueError, match="per_distance"):
        measure_decay(gpt2, prompt_stream="published", passes="one", distances=[30, 60], n_prompts=1, seeds=(42,))


def test_gpt2_end_to_end_report(gpt2, tmp_path):
    from levyattn.lens import write_lens_outputs

    meas = measure_decay(gpt2, distances=DIST, n_prompts=4, seeds=(42,))
    res = analyze_decay(meas, n_boot=100)
    assert res.head_gamma.shape == (2, 2) and np.isfinite(res.head_gamma).all()
    paths = write_lens_outputs(res, tmp_path / "out")
    for key in ("json", "html", "decay_png", "heatmap_png", "layers_png"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    import json

    data = json.loads(paths["json"].read_text())
    assert data["gamma"] == pytest.approx(res.power.gamma)
    assert len(data["measurement"]["per_prompt"][0]) == 4
    assert np.array(data["measurement"]["per_layer_head"]).shape == (2, 2, len(DIST))
    assert "feature-space" in paths["html"].read_text()


def test_encoder_bert(bert):
    meas = measure_decay(bert, distances=[10, 30, 60, 120], n_prompts=2, seeds=(42,))
    assert not meas.causal and meas.passes == "per_distance" and meas.n_passes == 4
    dense = measure_decay(
        bert,
        protocol="dense",
        distances=[10, 30, 60, 120],
        n_prompts=2,
        seeds=(42,),
        dense=DenseOptions(direction="forward"),
    )
    assert np.all(dense.aggregate > 0) and dense.info["dense"]["direction_used"] == "forward"
    with pytest.raises(ValueError, match="causal"):
        measure_decay(bert, passes="one", distances=[30, 60], n_prompts=1, seeds=(42,))
    # default grid: BERT's 512 positions keep the distances with d + 50 <= 512
    meas = measure_decay(bert, n_prompts=1, seeds=(42,), distances=None, passes="per_distance")
    assert meas.distances.tolist() == [10, 20, 30, 50, 100, 200] and meas.info["dropped_distances"] == [500, 1000, 2000]


def test_alibi_bloom():
    from transformers import BloomConfig, BloomModel

    torch.manual_seed(3)
    m = BloomModel(BloomConfig(n_layer=2, n_head=2, hidden_size=64, vocab_size=2000)).eval()
    meas = measure_decay(m, distances=[30, 60, 120, 240], n_prompts=2, seeds=(42,))
    assert meas.causal and np.isfinite(analyze_decay(meas, n_boot=50).power.gamma)


def test_dense_options(gpt2):
    kw = dict(protocol="dense", distances=[30, 60, 120], n_prompts=2, seeds=(42,))
    base = measure_decay(gpt2, **kw)
    keep = measure_decay(gpt2, dense=DenseOptions(exclude_sink=0), **kw)
    n = 120 + 50
    assert base.pair_counts.tolist() == [2 * (n - d - 1) for d in (30, 60, 120)]  # the sink key dropped
    assert keep.pair_counts.tolist() == [2 * (n - d) for d in (30, 60, 120)]
    rel = measure_decay(gpt2, dense=DenseOptions(normalize="relative"), **kw)
    ren = measure_decay(gpt2, dense=DenseOptions(normalize="renorm"), **kw)
    assert np.all(rel.aggregate > base.aggregate) and np.all(ren.aggregate >= base.aggregate)
    with pytest.raises(ValueError, match="causal"):
        measure_decay(gpt2, dense=DenseOptions(direction="both"), **kw)
    with pytest.raises(ValueError, match="normalize"):
        DenseOptions(normalize="softmax")


def test_local_directory_and_text_corpus(tmp_path, gpt2):
    lines = [f"the cat number {i} sat on the mat and the dog ran far away" for i in range(80)]
    tok = make_tokenizer(lines)
    gpt2.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    meas = measure_decay(str(tmp_path / "model"), corpus=corpus, distances=[30, 60, 120], n_prompts=2, seeds=(42,))
    assert meas.info["corpus"] == str(corpus) and meas.info["corpus_tokens"] > 800
    assert np.all(np.isfinite(meas.aggregate))
    # the published range starts at 1000, beyond this vocabulary: a range after its special tokens is taken
    small = measure_decay(str(tmp_path / "model"), distances=[30, 60], n_prompts=1, seeds=(42,))
    low, high = small.info["token_range"]
    assert low == 3 and high == tok.vocab_size - 1 and "small vocabulary" in small.info["from"]
    rnd = measure_decay(str(tmp_path / "model"), distances=[30, 60], n_prompts=1, seeds=(42,), token_range=(3, 40))
    assert rnd.info["token_range"] == [3, 40] and np.all(rnd.aggregate > 0)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat", encoding="utf-8")
    with pytest.raises(ValueError, match="short.txt"):
        measure_decay(gpt2, tokenizer=tok, corpus=short, distances=[30], n_prompts=1, seeds=(42,))
    with pytest.raises(ValueError, match="tokenizer"):
        measure_decay(gpt2, corpus=corpus, distances=[30], n_prompts=1, seeds=(42,))
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        measure_decay(gpt2, corpus=tmp_path / "nothere.txt", distances=[30], n_prompts=1, seeds=(42,))


def test_attentions_fn_hook():
    m = PowerLawAttentionModel(gamma=0.9, max_positions=400)
    meas = measure_decay(
        attentions_fn=lambda ids: m(ids, output_attentions=True).attentions,
        token_range=(1000, 5000),
        distances=[30, 60, 120, 240],
        n_prompts=1,
        seeds=(42,),
    )
    assert abs(analyze_decay(meas, n_boot=20).power.gamma - 0.9) < 0.01


class _NoAttention(torch.nn.Module):
    def forward(self, input_ids, output_attentions=False, **kw):
        return SimpleNamespace(attentions=None)


class _Fused(torch.nn.Module):
    config = SimpleNamespace(_attn_implementation="flash_attention_2", vocab_size=2000)

    def forward(self, input_ids, **kw):  # pragma: no cover - refused before any call
        raise AssertionError


def test_bad_inputs(gpt2, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\[2100\].*context of 2100"):
        measure_decay(gpt2, distances=[30, 2100], n_prompts=1, seeds=(42,))
    with pytest.raises(ValueError, match="no attention weights"):
        measure_decay(_NoAttention(), token_range=(1000, 2000), distances=[30, 60], n_prompts=1, seeds=(42,))
    with pytest.raises(ValueError, match="flash_attention_2.*cannot return attention weights"):
        measure_decay(_Fused(), distances=[30, 60], n_prompts=1, seeds=(42,))
    with pytest.raises(TypeError, match="nn.Module"):
        measure_decay(object(), distances=[30], n_prompts=1)
    with pytest.raises(TypeError, match="attentions_fn"):
        measure_decay(None)
    with pytest.raises(ValueError, match="protocol"):
        measure_decay(gpt2, protocol="fast")
    with pytest.raises(ValueError, match="n_prompts"):
        measure_decay(gpt2, n_prompts=0)
    with pytest.raises(ValueError, match="distances must be integers"):
        measure_decay(gpt2, distances=[30, 0.5])
    with pytest.raises(ValueError, match="vocabulary of 1 tokens.*--token-range LOW HIGH"):
        measure_decay(PowerLawAttentionModel(vocab_size=1, max_positions=200), distances=[30], n_prompts=1)
    with pytest.raises(ValueError, match=r"token_range \(5, 3\).*--token-range"):
        measure_decay(gpt2, token_range=(5, 3), distances=[30], n_prompts=1)
    with pytest.raises(ValueError, match=r"token_range must be \(low, high\) integers, got \(False, True\)"):
        measure_decay(gpt2, token_range=(False, True), distances=[30], n_prompts=1)  # booleans are no token ids
    # ids past the embedding table: an IndexError deep in GPT-2; the stand-in hashed them silently
    with pytest.raises(ValueError, match=r"token_range \(1000, 49000\) exceeds the vocabulary of 2000 tokens"):
        measure_decay(gpt2, token_range=(1000, 49000), distances=[30], n_prompts=1)
    with pytest.raises(ValueError, match=r"token_range \(3, 2000\).*high <= 1999"):
        measure_decay(PowerLawAttentionModel(vocab_size=2000, max_positions=200), token_range=(3, 2000),
                      distances=[30], n_prompts=1)  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="nobody-here/no-model.*HF_HUB_OFFLINE"):
        measure_decay("nobody-here/no-model", n_prompts=1)
    with pytest.raises(FileNotFoundError, match="not a valid"):
        measure_decay(str(tmp_path / "a" / "b" / "c"), n_prompts=1)


def test_repeated_seeds_are_refused(gpt2):
    """A repeated seed draws the same prompts twice; counted as new ones they would narrow the CI."""
    with pytest.raises(ValueError, match=r"seeds must be distinct, got \[42, 7, 42\] with \[42\] repeated"):
        measure_decay(gpt2, distances=[30, 60], n_prompts=2, seeds=(42, 7, 42), token_range=(3, 1999))
    with pytest.raises(ValueError, match=r"seeds must be distinct.*\[7\] repeated"):
        measure_decay(gpt2, distances=[30, 60], n_prompts=2, seeds=[np.int64(7), 7], token_range=(3, 1999))


def test_the_callers_model_keeps_its_dtype_and_mode():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=200, vocab_size=2000)).train()
    model.transformer.h[0].eval()  # a mixed state, restored module by module
    kw = dict(distances=[30, 60], n_prompts=1, seeds=(42,), token_range=(3, 1999), device="cpu")
    cast = measure_decay(model, dtype="float64", **kw)  # measured on a float64 copy
    assert cast.info["dtype"] == "torch.float64"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.training and not model.transformer.h[0].training and model.transformer.h[0].attn.training is False
    same = measure_decay(model, dtype="float32", **kw)  # nothing to move: measured in place, modes restored
    assert model.training and not model.transformer.h[0].training and model.lm_head.training
    np.testing.assert_allclose(same.prompt_layer, cast.prompt_layer, rtol=1e-5)


def test_progress_bar_stays_off_a_stderr_that_is_not_a_terminal(capsys):
    # captured stderr is no terminal (as a pipe is not): progress=True must not fill it with redraws
    m = PowerLawAttentionModel(gamma=0.73, n_layers=1, n_heads=1, max_positions=300)
    measure_decay(m, protocol="dense", distances=[30, 60, 120], n_prompts=2, seeds=(42,), progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "pass/s" not in captured.err


def test_dense_encoder_special_token_frame(bert, tmp_path):
    """frame_special wraps each prompt as [CLS] ... [SEP]; exclude_special leaves their rows and columns out."""
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(1995)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    kw = dict(protocol="dense", distances=[10, 30], n_prompts=2, seeds=(42,), tokenizer=tok, token_range=(5, 1999))
    framed = measure_decay(bert, dense=DenseOptions(frame_special=True, exclude_sink=0), **kw)
    kept = measure_decay(bert, dense=DenseOptions(frame_special=True, exclude_sink=0, exclude_special=False), **kw)
    plain = measure_decay(bert, dense=DenseOptions(exclude_sink=0), **kw)
    n = 30 + 50  # the drawn tokens; framed passes have n + 2
    assert framed.n_tokens == 2 * (n + 2) and plain.n_tokens == 2 * n
    # both directions: n - d pairs each way among the drawn tokens; the frame adds 2 (n + 2 - d) - 2 (n - d) = 4 pairs
    assert framed.pair_counts.tolist() == [2 * 2 * (n - d) for d in (10, 30)]
    assert kept.pair_counts.tolist() == [2 * 2 * (n + 2 - d) for d in (10, 30)]
    assert not np.allclose(framed.aggregate, kept.aggregate) and not np.allclose(framed.aggregate, plain.aggregate)
    assert framed.info["dense"]["frame_special"] is True
    rows = measure_decay(bert, dense=DenseOptions(query_rows=8), **kw)
    assert rows.pair_counts.sum() < plain.pair_counts.sum() and np.all(np.isfinite(rows.aggregate))
    with pytest.raises(ValueError, match="frame_special=True needs the model.s tokenizer"):
        measure_decay(bert, protocol="dense", distances=[10], n_prompts=1, seeds=(42,),
                      dense=DenseOptions(frame_special=True))
    with pytest.raises(ValueError, match="query_rows"):
        DenseOptions(query_rows=1)


def test_repeated_text_windows_are_refused_or_said(tmp_path):
    """Windows of a short text are drawn with replacement: a repeated window is one prompt counted twice."""
    words = [f"w{i}" for i in range(500)]
    tok = make_tokenizer([" ".join(words)])
    corpus = tmp_path / "short.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(words, size=200)), encoding="utf-8")
    model = PowerLawAttentionModel(gamma=0.8, noise=0.5, max_positions=400)
    kw = dict(corpus=corpus, tokenizer=tok)
    # 90 prompts of 170 tokens from 31 windows: 27 distinct, the CI ~45% too narrow
    with pytest.raises(ValueError, match=r"63 of the 90 prompts of 170 tokens repeat a window .* 27 distinct drawn\)"
                                         r": .* narrow the CI by about 45%"):  # fmt: skip
        measure_decay(model, distances=[30, 60, 120], n_prompts=30, seeds=(42, 123, 7), **kw)
    # 20 prompts of 80 tokens from 121 windows: one repeat, said
    with pytest.warns(RuntimeWarning, match=r"1 of the 20 prompts of 80 tokens repeat a window"):
        m = measure_decay(model, distances=[30], n_prompts=10, seeds=(42, 7), **kw)
    assert m.info["corpus_windows"] == [{"length": 80, "prompts": 20, "distinct_windows": 19}]
