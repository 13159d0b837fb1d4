"""Modules: the nn.MultiheadAttention call, options, layers, the key/value cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from levyattn import (
    FractionalMultiheadAttention,
    FractionalTransformerDecoderLayer,
    FractionalTransformerEncoderLayer,
    KVCache,
    SoftmaxMultiheadAttention,
    fractional_attention,
    make_attention,
)


class TinyModel(nn.Module):
    """A model written for nn.MultiheadAttention (positional call, need_weights default)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.attn = attention
        self.head = nn.Linear(16, 2)

    def forward(self, ids, padding):
        x = self.embed(ids)
        out, _ = self.attn(x, x, x, key_padding_mask=padding)
        return self.head(out.mean(1))


@pytest.mark.parametrize(
    "make", [lambda: nn.MultiheadAttention(16, 2, batch_first=True), lambda: FractionalMultiheadAttention(16, 2)]
)
def test_same_call_as_multihead_attention_trains(make):
    torch.manual_seed(0)
    model = TinyModel(make())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 20, (8, 6))
    labels = (ids[:, 0] > 10).long()
    padding = torch.zeros(8, 6, dtype=torch.bool)
    padding[:, -1] = True
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(ids, padding), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_module_equals_functional_with_its_projections():
    torch.manual_seed(0)
    m = FractionalMultiheadAttention(12, 3, alpha=1.4, bias=True)
    x = torch.randn(2, 5, 12)
    out, w = m(x, x, x, need_weights=True, average_attn_weights=False)
    heads = lambda t: t.view(2, 5, 3, 4).transpose(1, 2)  # noqa: E731
    o, w_ref = fractional_attention(
        heads(m.q_proj(x)), heads(m.k_proj(x)), heads(m.v_proj(x)), alpha=1.4, return_weights=True
    )
    expected = m.out_proj(o.transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=1.4),
        dict(alpha=1.3, bandwidth=0.7, learnable_alpha=True, learnable_bandwidth=True),
        dict(alpha=0.9, qk_share=True),
    ],
    ids=["float", "learnable", "qk_share"],
)
@pytest.mark.parametrize("kernel", [False, True], ids=["tile loop", "fused kernel"])
def test_module_call_equals_fractional_attention_on_reference(monkeypatch, options, kernel):
    """The module builds its call from the options it checked when it was built (not through
    ``fractional_attention``): output and every parameter's gradient as ``reference`` gives them."""
    if kernel:
        monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)
    torch.manual_seed(0)
    m = FractionalMultiheadAttention(12, 3, bias=True, **options).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    out, _ = m(x, x, x, key_padding_mask=padding, is_causal=True)
    heads = lambda t: t.view(2, 5, 3, 4).transpose(1, 2)  # noqa: E731
    o = fractional_attention(
        heads(m._project_query(x)), heads(m._project_key(x)), heads(m.v_proj(x)), alpha=m.alpha,
        bandwidth=m.bandwidth, attn_mask=~padding.view(2, 1, 1, 5), is_causal=True, exclude_self=m.qk_share,
        backend="reference",
    )  # fmt: skip
    expected = m.out_proj(o.transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for name, g, e in zip([n for n, p in m.named_parameters() if p.requires_grad], grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=name)


def test_mask_conventions_follow_multihead_attention():
    torch.manual_seed(0)
    m = FractionalMultiheadAttention(8, 2)
    x = torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    _, w = m(x, x, x, key_padding_mask=padding, need_weights=True)
    assert w.shape == (2, 5, 5) and (w[1, :, 3:] == 0).all()
    blocked = torch.zeros(5, 5, dtype=torch.bool)
    blocked[:, 0] = True  # True = not allowed, as in nn.MultiheadAttention
    _, w = m(x, x, x, attn_mask=blocked, need_weights=True, average_attn_weights=False)
    assert w.shape == (2, 2, 5, 5) and (w[..., 0] == 0).all()
    additive = torch.zeros(5, 5).masked_fill(blocked, float("-inf"))
    out_bool, _ = m(x, x, x, attn_mask=blocked)
    out_add, _ = m(x, x, x, attn_mask=additive)
    torch.testing.assert_close(out_bool, out_add)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        m(x, x, x, key_padding_mask=padding[:, :4])
    with pytest.raises(ValueError, match="attn_mask must be"):
        m(x, x, x, attn_mask=blocked[:4])


@pytest.mark.parametrize("attention", ["fna", "softmax"])
@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
@pytest.mark.parametrize("dtype", [torch.long, torch.uint8, torch.int32])
def test_integer_masks_are_refused_as_multihead_attention_refuses_them(attention, name, dtype):
    # Added to the logits, a mask of 1s for padding would leave the padded keys most of their weight.
    m = make_attention(attention, 8, 2)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=dtype) if name == "key_padding_mask" else torch.zeros(5, 5, dtype=dtype)
    mask[..., 3:] = 1
    with pytest.raises(TypeError, match=f"{name} must be bool or floating, got torch.{str(dtype).split('.')[-1]}"):
        m(x, x, x, **{name: mask})
    with pytest.raises(AssertionError):  # torch's own module refuses them too
        torch.nn.MultiheadAttention(8, 2, batch_first=True)(x, x, x, **{name: mask})


def test_sequence_first_layout():
    torch.manual_seed(0)
    first = FractionalMultiheadAttention(8, 2, batch_first=False)
    batch = FractionalMultiheadAttention(8, 2)
    batch.load_state_dict(first.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(
        first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))[0].transpose(0, 1), batch(x, x, x)[0]
    )


def test_options_orthogonal_qk_share_learnable():
    torch.manual_seed(0)
    m = FractionalMultiheadAttention(
        8, 2, orthogonal=True, learnable_alpha=True, learnable_bandwidth=True, alpha=1.9, bandwidth=0.5
    )
    w = m.q_proj.weight
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.alpha, torch.full((2,), 1.9))
    torch.testing.assert_close(m.bandwidth, torch.full((2,), 0.5))
    opt = torch.optim.Adam([m.alpha_logit, m.log_bandwidth], lr=5.0)  # large steps: saturate the ranges
    x = torch.randn(3, 6, 8)
    for _ in range(5):
        opt.zero_grad()
        m(x, x, x)[0].square().sum().backward()
        opt.step()
    assert ((m.alpha > 0) & (m.alpha < 2)).all() and (m.bandwidth > 0).all()
    assert not torch.allclose(m.alpha, torch.full((2,), 1.9))

    single = FractionalMultiheadAttention(8, 1, orthogonal=True, qk_share=True)
    assert single.q_proj is None and single.k_proj is None  # the reference's isometric single head
    _, w = single(x, x, x, need_weights=True)
    assert (torch.diagonal(w, dim1=-2, dim2=-1) == 0).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(embed_dim=10, num_heads=3), "num_heads must be a positive int dividing"),
        (dict(embed_dim=8, num_heads=2, alpha=3.0), "alpha"),
        (dict(embed_dim=8, num_heads=2, dropout=1.5), "dropout"),
        (dict(embed_dim=8, num_heads=2, backend="fast"), "backend"),
        (dict(embed_dim=8, num_heads=2, qk_share=True, kdim=4), "qk_share needs kdim"),
    ],
)
def test_bad_module_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        FractionalMultiheadAttention(**kw)


def test_make_attention_switch():
    assert isinstance(make_attention("fna", 8, 2, alpha=1.5), FractionalMultiheadAttention)
    soft = make_attention("softmax", 8, 2, alpha=1.5, learnable_alpha=True)  # kernel options dropped
    assert isinstance(soft, SoftmaxMultiheadAttention)
    reference = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
    with torch.no_grad():
        soft.q_proj.weight.copy_(reference.in_proj_weight[:8])
        soft.k_proj.weight.copy_(reference.in_proj_weight[8:16])
        soft.v_proj.weight.copy_(reference.in_proj_weight[16:])
        soft.out_proj.weight.copy_(reference.out_proj.weight)
    x = torch.randn(2, 5, 8)
    out, w = soft(x, x, x, need_weights=True)
    out_ref, w_ref = reference(x, x, x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)
    with pytest.raises(ValueError, match="attention must be one of"):
        make_attention("linear", 8, 2)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("qk_share", [False, True])
def test_softmax_keeps_the_projection_options(heads, qk_share):
    """orthogonal and qk_share constrain softmax's projections as FNA's: the same parameters."""
    torch.manual_seed(0)
    fna = make_attention("fna", 8, heads, orthogonal=True, qk_share=qk_share)
    soft = make_attention("softmax", 8, heads, orthogonal=True, qk_share=qk_share)
    shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in (fna, soft)]
    assert shapes[0] == shapes[1]
    assert (soft.q_proj is None) == (heads == 1)
    for proj in (soft.q_proj, soft.k_proj):
        if proj is not None:
            torch.testing.assert_close(proj.weight @ proj.weight.T, torch.eye(8), atol=1e-5, rtol=0)


def test_orthogonal_one_head_softmax_scores_are_plain_dot_products():
    # One head, shared orthogonal projection: the scores are x_i . x_j / sqrt(d), self-pairs excluded.
    torch.manual_seed(0)
    soft = make_attention("softmax", 8, 1, orthogonal=True, qk_share=True)
    x = torch.randn(2, 5, 8)
    _, w = soft(x, x, x, need_weights=True)
    logits = (x @ x.transpose(-1, -2)) / math.sqrt(8)
    expected = torch.softmax(logits.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf")), dim=-1)
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("qk_share", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_softmax_fused_path_equals_its_explicit_weights(monkeypatch, is_causal, qk_share, padded):
    # need_weights computes softmax(logits) @ v in the open; the fused SDPA call (SDPA's own
    # causal path when there is no other mask, else one additive mask) must give the same output.
    torch.manual_seed(0)
    soft = make_attention("softmax", 8, 2, qk_share=qk_share).eval()
    x = torch.randn(3, 6, 8)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]]) if padded else None
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        sdpa_calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    fused, _ = soft(x, x, x, key_padding_mask=padding, is_causal=is_causal)
    explicit, w = soft(
        x, x, x, key_padding_mask=padding, is_causal=is_causal, need_weights=True, average_attn_weights=False
    )
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-5)
    own_causal_path = is_causal and not (qk_share or padded)
    assert sdpa_calls[0].get("is_causal", False) == own_causal_path
    assert (sdpa_calls[0].get("attn_mask") is None) == (not (is_causal or qk_share or padded) or own_causal_path)
    if is_causal:
        assert (w.triu(1) == 0).all()
    if qk_share:
        assert (w.diagonal(dim1=-2, dim2=-1)[..., 1:] == 0).all()  # under causal, row 0 has only itself


@pytest.mark.parametrize("attention", ["fna", "softmax"])
@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
@pytest.mark.parametrize(
    "key_shape, value_shape, match",
    [
        # The fused kernel read a key batch of 1 against queries of batch 2 (output off by 0.30 from
        # reference's broadcast), and every backend but reference took the first 7 of 8 values.
        ((1, 7, 12), (1, 7, 12), "need query's batch size 2, got 1"),
        ((2, 7, 12), (2, 8, 12), r"same batch size and length, got \(batch, length\) \(2, 7\) and \(2, 8\)"),
        ((2, 7, 12), (1, 7, 12), r"same batch size and length"),
        ((7, 12), (7, 12), "key must be 3-D"),
    ],
)
def test_keys_and_values_that_do_not_fit_the_query_are_refused(attention, backend, key_shape, value_shape, match):
    kwargs = {"backend": backend} if attention == "fna" else {}
    m = make_attention(attention, 12, 3, **kwargs)
    query = torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match=match):
        m(query, torch.randn(key_shape), torch.randn(value_shape))
    with pytest.raises((AssertionError, RuntimeError)):  # torch's own module refuses them too
        nn.MultiheadAttention(12, 3, batch_first=True)(query, torch.randn(key_shape), torch.randn(value_shape))



@pytest.mark.parametrize("attention", ["fna", "softmax"])
def test_is_causal_must_be_a_bool(attention):
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="is_causal must be a bool, got str 'False'"):
        make_attention(attention, 8, 2)(x, x, x, is_causal="False")

def test_a_static_cache_filled_for_another_batch_is_refused():
    # Its keys and values are used as they are: a batch of 1 was broadcast over the queries'.
    m = FractionalMultiheadAttention(12, 3)
    cache = KVCache(static=True)
    m(torch.randn(1, 3, 12), torch.randn(1, 3, 12), torch.randn(1, 3, 12), kv_cache=cache)
    x = torch.randn(2, 1, 12)
    with pytest.raises(ValueError, match="kv_cache holds keys of batch size 1, but query has batch size 2"):
        m(x, x, x, kv_cache=cache)


@pytest.mark.parametrize("attention", ["fna", "softmax"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_padding_does_not_leak(attention, norm_first):
    torch.manual_seed(0)
    layer = FractionalTransformerEncoderLayer(
        8, 2, dim_feedforward=16, dropout=0.0, attention=attention, norm_first=norm_first
    ).eval()
    x = torch.randn(1, 6, 8)
    padding = torch.tensor([[False] * 4 + [True] * 2])
    out = layer(x, src_key_padding_mask=padding)
    x2 = x.clone()
    x2[:, 4:] = 100.0
    out2, w = layer(x2, src_key_padding_mask=padding, need_weights=True)
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert w.shape == (1, 2, 6, 6)


@pytest.mark.parametrize("attention", ["fna", "softmax"])
def test_decoder_cache_equals_full_recomputation(attention):
    torch.manual_seed(0)
    layer = FractionalTransformerDecoderLayer(
        8, 2, dim_feedforward=16, dropout=0.0, self_attention=attention, cross_attention=attention
    ).eval()
    memory, tgt = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    full = layer(tgt, memory)
    cache = KVCache()
    projections = []
    layer.cross_attn.v_proj.register_forward_hook(lambda *_: projections.append(1))
    steps = [layer(tgt[:, i : i + 1], memory, cache=cache) for i in range(5)]
    assert len(cache) == 5 and len(cache.memory) == 4
    assert len(projections) == 1  # the encoder output is projected once, not per step
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reorder(torch.tensor([1, 1, 0]))
    assert cache.key.shape[0] == 3 and cache.memory.key.shape[0] == 3


def _torch_twin(embed_dim: int, num_heads: int, batch_first: bool) -> tuple[nn.Module, nn.Module]:
    """torch.nn.MultiheadAttention and the softmax module with the same (float64) weights."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(embed_dim, num_heads, bias=True, batch_first=batch_first).double().eval()
    nn.init.normal_(ref.in_proj_bias)
    nn.init.normal_(ref.out_proj.bias)
    ours = make_attention("softmax", embed_dim, num_heads, bias=True, batch_first=batch_first).double().eval()
    _copy_attention(ours, ref)
    return ref, ours


def _copy_attention(ours: nn.Module, ref: nn.MultiheadAttention) -> None:
    """ref's packed q/k/v and output projections into ours's separate ones."""
    with torch.no_grad():
        for proj, weight, bias in zip(
            (ours.q_proj, ours.k_proj, ours.v_proj), ref.in_proj_weight.chunk(3), ref.in_proj_bias.chunk(3)
        ):
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_softmax_layers_equal_torch_transformer_layers(norm_first, activation):
    """The encoder and decoder layers with softmax attention are torch's, given the same weights:
    the arguments reach the same places (norms, feed-forward, residual wiring, masks)."""
    torch.manual_seed(0)
    kw = dict(dim_feedforward=16, dropout=0.0, activation=activation, layer_norm_eps=1e-5, norm_first=norm_first)
    pairs = (
        (FractionalTransformerEncoderLayer(8, 2, attention="softmax", bias=True, **kw),
         nn.TransformerEncoderLayer(8, 2, batch_first=True, **kw)),
        (FractionalTransformerDecoderLayer(8, 2, self_attention="softmax", cross_attention="softmax", bias=True, **kw),
         nn.TransformerDecoderLayer(8, 2, batch_first=True, **kw)),
    )  # fmt: skip
    for ours, ref in pairs:
        ours.double().eval(), ref.double().eval()
        _copy_attention(ours.self_attn, ref.self_attn)
        if hasattr(ref, "multihead_attn"):
            _copy_attention(ours.cross_attn, ref.multihead_attn)
        with torch.no_grad():
            for name in ("linear1", "linear2"):
                getattr(ours.feed_forward, name).load_state_dict(getattr(ref, name).state_dict())
            for name in ("norm1", "norm2", "norm3"):
                if hasattr(ref, name):
                    nn.init.normal_(getattr(ref, name).weight)
                    nn.init.normal_(getattr(ref, name).bias)
                    getattr(ours, name).load_state_dict(getattr(ref, name).state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    memory = torch.randn(2, 7, 8, generator=gen, dtype=torch.float64)
    padding, memory_padding = torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)
    padding[0, -2:], memory_padding[1, -3:] = True, True
    (encoder, torch_encoder), (decoder, torch_decoder) = pairs
    torch.testing.assert_close(encoder(x, src_key_padding_mask=padding), torch_encoder(x, src_key_padding_mask=padding))
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    torch.testing.assert_close(
        decoder(x, memory, memory_key_padding_mask=memory_padding),
        torch_decoder(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_padding),
    )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "padding", "bool", "float", "per_head", "causal", "all"])
@pytest.mark.parametrize("average", [True, False])
def test_softmax_twin_equals_torch_multihead_attention(batch_first, mask, average):
    b, heads, nk, e = 3, 2, 7, 8
    nq = nk if mask == "causal" else 5  # causal: self-attention, where torch's hint applies
    ref, ours = _torch_twin(e, heads, batch_first)
    gen = torch.Generator().manual_seed(1)
    shape_q, shape_k = ((b, nq, e), (b, nk, e)) if batch_first else ((nq, b, e), (nk, b, e))
    query = torch.randn(shape_q, generator=gen, dtype=torch.float64)
    key = torch.randn(shape_k, generator=gen, dtype=torch.float64)
    value = torch.randn(shape_k, generator=gen, dtype=torch.float64)
    padding = torch.zeros(b, nk, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    blocked = torch.rand(nq, nk, generator=gen) < 0.3
    blocked[:, 0] = False  # every row keeps a key: torch gives NaN rows otherwise
    causal = torch.ones(nq, nk, dtype=torch.bool).triu(1)
    kwargs = {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "bool": {"attn_mask": blocked},
        "float": {"attn_mask": torch.randn(nq, nk, generator=gen, dtype=torch.float64)},
        "per_head": {"attn_mask": torch.randn(b * heads, nq, nk, generator=gen, dtype=torch.float64)},
        # torch takes is_causal as a hint that attn_mask is the causal mask.
        "causal": {"attn_mask": causal, "is_causal": True},
        "all": {"attn_mask": blocked, "key_padding_mask": padding},
    }[mask]
    expected, expected_w = ref(query, key, value, need_weights=True, average_attn_weights=average, **kwargs)
    got, got_w = ours(query, key, value, need_weights=True, average_attn_weights=average, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-12, atol=1e-12)
    fused, no_w = ours(query, key, value, need_weights=False, **kwargs)
    assert no_w is None
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("attention", ["fna", "softmax"])
def test_weights_under_dropout_are_the_ones_the_output_used(attention):
    """As nn.MultiheadAttention returns them while training (the softmax twin returned the weights
    before dropout: 0.51 off torch's, whose output it matched exactly)."""
    torch.manual_seed(0)
    m = make_attention(attention, 8, 2, dropout=0.5).double().train()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    out, weights = m(x, x, x, need_weights=True, average_attn_weights=False)
    assert (weights == 0).any() and weights.sum(-1).max() > 1.5  # dropped, and the rest scaled up
    v = m._heads(m.v_proj(x))
    expected = m.out_proj((weights @ v).transpose(1, 2).reshape(2, 4, 8))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if attention == "softmax":
        ref, ours = _torch_twin(8, 2, batch_first=True)
        ref.dropout = ours.dropout = 0.5
        ref.train(), ours.train()
        results = []
        for module in (ref, ours):
            torch.manual_seed(1)
            results.append(module(x, x, x, need_weights=True, average_attn_weights=False))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)

def test_defaults_that_differ_from_torch_multihead_attention_are_documented():
    """Same call, other defaults: batch_first=True, bias=False, need_weights=False."""
    m = FractionalMultiheadAttention(8, 2)
    assert m.batch_first and m.out_proj.bias is None
    x = torch.randn(2, 3, 8)
    assert m(x, x, x)[1] is None
    doc = FractionalMultiheadAttention.__doc__
    assert "Not a drop-in" in doc and "batch_first=True" in doc and "bias=False" in doc


def test_kernel_options_are_one_fnaconfig():
    from levyattn import FNAConfig
    from levyattn.models import TextClassifierConfig

    assert FractionalMultiheadAttention(8, 2).kernel == FNAConfig()
    assert FractionalMultiheadAttention(8, 2, qk_share=True, alpha=1.5).kernel == FNAConfig(
        alpha=1.5, exclude_self=True
    )
    config = TextClassifierConfig(vocab_size=5)
    for name in ("alpha", "bandwidth", "manifold", "rescale"):
        assert getattr(config, name) == getattr(FNAConfig(), name)
    with pytest.raises(TypeError, match="rescale must be a bool"):
        FractionalMultiheadAttention(8, 2, rescale=1)
    with pytest.raises(ValueError, match="manifold must be one of"):
        TextClassifierConfig(vocab_size=5, manifold="torus")
