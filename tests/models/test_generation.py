"""Seq2seq and causal LM: masks, causality, label smoothing, KV-cache decoding equal to
recomputation, beam size 1 equal to greedy, sampling filters, and a seq2seq that learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from levyattn.models import CausalLM, CausalLMConfig, Seq2SeqConfig, Seq2SeqTransformer, sample_next, sequence_loss


def s2s(**kw) -> Seq2SeqTransformer:
    base = dict(src_vocab_size=20, tgt_vocab_size=20, d_model=16, num_heads=2, num_encoder_layers=2,
                num_decoder_layers=2, max_len=24, dropout=0.0)  # fmt: skip
    return Seq2SeqTransformer(Seq2SeqConfig(**{**base, **kw})).eval()


def lm(**kw) -> CausalLM:
    base = dict(vocab_size=25, block_size=12, d_model=16, num_heads=2, num_layers=2)
    return CausalLM(CausalLMConfig(**{**base, **kw})).eval()


MIXES = [
    {},
    {"encoder_attention": "softmax", "decoder_attention": "softmax", "cross_attention": "softmax"},
    {"encoder_attention": "fna", "decoder_attention": "softmax", "cross_attention": "fna"},
    {"norm_first": True, "tie_output": False, "share_embeddings": True},
    {"qk_share": True, "orthogonal": True, "learnable_alpha": True},
]


@pytest.mark.parametrize("kw", MIXES, ids=range(len(MIXES)))
def test_seq2seq_forward_weights_masks(kw):
    torch.manual_seed(0)
    model = s2s(**kw)
    src, tgt = torch.randint(3, 20, (2, 6)), torch.randint(3, 20, (2, 5))
    plain = model(src, tgt)
    logits = plain.logits
    assert logits.shape == (2, 5, 20)
    assert (plain.attentions, plain.encoder_attentions, plain.cross_attentions) == (None, None, None)
    out = model(src, tgt, output_attentions=True)
    torch.testing.assert_close(out.logits, logits)  # the weights path computes the same function
    assert [w.shape for w in (out.encoder_attentions[0], out.attentions[1], out.cross_attentions[0])] == [
        (2, 2, 6, 6), (2, 2, 5, 5), (2, 2, 5, 6)]  # fmt: skip
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
    # Source padding (pad_id by default) changes nothing; future target tokens change nothing earlier.
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, tgt).logits, logits, atol=1e-5, rtol=1e-5)
    pad_mask = torch.zeros(2, 9, dtype=torch.bool)
    pad_mask[:, 6:] = True
    torch.testing.assert_close(model(padded, tgt, src_key_padding_mask=pad_mask).logits, logits, atol=1e-5, rtol=1e-5)
    changed = tgt.clone()
    changed[:, 3:] = 4
    torch.testing.assert_close(model(src, changed).logits[:, :3], logits[:, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(src, changed).logits[:, 3:], logits[:, 3:])
    if kw.get("share_embeddings"):
        assert model.src_embedding is model.tgt_embedding and model.generator.weight is not model.tgt_embedding.weight
    elif model.config.tie_output:
        assert model.generator.weight is model.tgt_embedding.weight


def test_label_smoothing_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 4, 7), torch.randint(1, 7, (2, 4))
    targets[1, 2:] = 0
    loss, n = sequence_loss(logits, targets, pad_id=0)
    keep = targets != 0
    assert n == 6
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))
    eps = 0.1
    smooth, _ = sequence_loss(logits, targets, pad_id=0, label_smoothing=eps)
    logp = logits[keep].log_softmax(-1)
    expected = (1 - eps) * F.nll_loss(logp, targets[keep]) - eps * logp.mean(-1).mean()
    torch.testing.assert_close(smooth, expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        sequence_loss(logits, targets, 0, label_smoothing=1.0)


@pytest.mark.parametrize("kw", MIXES[:4], ids=range(4))
def test_seq2seq_cache_and_beam_one_equal_greedy(kw):
    torch.manual_seed(1)
    model = s2s(**kw)
    src = torch.randint(3, 20, (3, 7))
    src[0, 5:] = 0  # padding
    greedy = model.generate(src, max_len=10)
    torch.testing.assert_close(model.generate(src, max_len=10, use_cache=False), greedy)
    torch.testing.assert_close(model.generate(src, max_len=10, beam_size=1), greedy)
    # Beam size 1 through the beam-search code path equals greedy too.
    memory, mask = model.encode(src)
    with torch.no_grad():
        torch.testing.assert_close(model._beam(memory, mask, 10, 1, 1.0, True), greedy)
    beam = model.generate(src, max_len=10, beam_size=3, length_penalty=0.6)
    torch.testing.assert_close(model.generate(src, max_len=10, beam_size=3, length_penalty=0.6, use_cache=False), beam)


def test_cached_decoder_logits_equal_full_prefix():
    torch.manual_seed(2)
    model = s2s()
    src, tgt = torch.randint(3, 20, (2, 6)), torch.randint(3, 20, (2, 7))
    memory, mask = model.encode(src)
    full = model.decode(tgt, memory, mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, mask, cache=cache) for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_seq2seq_overfits_a_few_pairs():
    torch.manual_seed(0)
    model = s2s(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, label_smoothing=0.0,
                max_len=12)  # fmt: skip
    c = model.config
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 20, (6, 5), generator=g)
    body = (src.flip(1) % 17) + 3  # a deterministic "translation": reverse and relabel
    targets = torch.cat([body, torch.full((6, 1), c.eos_id)], dim=1)
    tgt_in = torch.cat([torch.full((6, 1), c.bos_id), body], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        loss, _ = model.loss(model(src, tgt_in).logits, targets)
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    torch.testing.assert_close(model.generate(src, max_len=8), targets)
    beam = model.generate(src, max_len=8, beam_size=3)
    torch.testing.assert_close(beam, targets)


# --- causal LM -----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["fna", "softmax"])
def test_lm_shapes_causality_and_hf_output(attention):
    torch.manual_seed(0)
    model = lm(attention=attention)
    ids = torch.randint(0, 25, (2, 8))
    logits = model(ids).logits
    assert logits.shape == (2, 8, 25)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 25
    torch.testing.assert_close(model(changed).logits[:, :5], logits[:, :5])
    out = model(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 8, 8)
    assert torch.all(out.attentions[1].triu(1) == 0)
    torch.testing.assert_close(out.logits, logits)
    # Cached step-by-step logits equal the full forward.
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(8)], dim=1)
    torch.testing.assert_close(steps, logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_size=12"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("kw", [{}, {"attention": "softmax"}, {"orthogonal": True, "learnable_bandwidth": True}])
def test_lm_cached_equals_uncached_generation(kw):
    torch.manual_seed(3)
    model = lm(**kw)
    prompt = torch.randint(0, 25, (3, 4))
    # 14 new tokens: the 12-token window slides, and the cache is rebuilt, as recomputation crops.
    greedy = model.generate(prompt, 14, temperature=0.0)
    assert greedy.shape == (3, 18) and torch.equal(greedy[:, :4], prompt)
    assert torch.equal(model.generate(prompt, 14, temperature=0.0, use_cache=False), greedy)
    for sampling in ({"temperature": 1.0}, {"temperature": 0.8, "top_k": 5}, {"temperature": 1.2, "top_p": 0.8}):
        a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7), **sampling)
        b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7), use_cache=False, **sampling)
        assert torch.equal(a, b), sampling
    # top_k = 1 and a tiny top_p are greedy.
    assert torch.equal(model.generate(prompt, 6, top_k=1, generator=torch.Generator().manual_seed(0)), greedy[:, :10])
    assert torch.equal(model.generate(prompt, 6, top_p=1e-6), greedy[:, :10])


def test_sample_next_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps tokens 0, 1 only
    nucleus = sample_next(logits, 1.0, top_p=0.8, generator=g)
    assert set(nucleus.tolist()) == {0, 1} and probs[:2].sum() >= 0.8 > probs[0]
    assert torch.equal(sample_next(logits, 0.0), torch.zeros(400, dtype=torch.long))
    model = lm()
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=-1.0)


def test_lm_tied_embeddings_and_same_size():
    model = lm()
    assert model.lm_head.weight is model.token_embedding.weight
    assert lm(tie_embeddings=False).lm_head.weight is not lm(tie_embeddings=False).token_embedding.weight
    n = sum(p.numel() for p in lm().parameters())
    assert n == sum(p.numel() for p in lm(attention="softmax").parameters())
