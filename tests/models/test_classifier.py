"""Text classifier and ViT: shapes, masks, the fna/softmax switch, every FNA option, sizes."""

from __future__ import annotations

import pytest
import torch

from levyattn.models import (
    TextClassifier,
    TextClassifierConfig,
    VisionTransformer,
    ViTConfig,
    count_parameters,
)
from levyattn.models.common import brownian_positions, sinusoidal_positions
from levyattn.nn import FractionalMultiheadAttention, SoftmaxMultiheadAttention


def tiny(**kw) -> TextClassifierConfig:
    base = dict(vocab_size=30, num_classes=3, d_model=16, num_heads=2, num_layers=2, max_len=16, dropout=0.0)
    return TextClassifierConfig(**{**base, **kw})


@pytest.mark.parametrize("attention", ["fna", "softmax"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_shapes_and_weights(attention, pooling, norm_first):
    torch.manual_seed(0)
    model = TextClassifier(tiny(attention=attention, pooling=pooling, norm_first=norm_first)).eval()
    kind = FractionalMultiheadAttention if attention == "fna" else SoftmaxMultiheadAttention
    assert all(isinstance(layer.self_attn, kind) for layer in model.layers)
    ids = torch.randint(0, 30, (3, 9))
    out = model(input_ids=ids, output_attentions=True)
    n = 9 + (pooling == "cls")
    assert out.logits.shape == (3, 3) and isinstance(out.attentions, tuple) and len(out.attentions) == 2
    assert all(w.shape == (3, 2, n, n) for w in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, 2, n))
    plain = model(ids)
    assert plain.attentions is None
    torch.testing.assert_close(plain.logits, out.logits)


@pytest.mark.parametrize("attention", ["fna", "softmax"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_logits(attention, pooling):
    torch.manual_seed(0)
    model = TextClassifier(tiny(attention=attention, pooling=pooling)).eval()
    short = torch.randint(1, 30, (1, 5))
    alone = model(short).logits
    for n_pad in (1, 6):
        padded = torch.cat([short, torch.randint(0, 30, (1, n_pad))], dim=1)  # padding holds junk
        mask = torch.zeros(1, 5 + n_pad, dtype=torch.bool)
        mask[:, 5:] = True
        torch.testing.assert_close(model(padded, key_padding_mask=mask).logits, alone, atol=1e-5, rtol=1e-5)
    # Without the mask the junk is attended to and pooled: the test can fail.
    assert not torch.allclose(model(padded).logits, alone, atol=1e-4)


def test_pad_id_gives_the_mask():
    torch.manual_seed(0)
    model = TextClassifier(tiny(pad_id=0)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    torch.testing.assert_close(model(ids).logits, model(ids, key_padding_mask=ids == 0).logits)
    torch.testing.assert_close(model(ids[:1, :3]).logits, model(ids).logits[:1], atol=1e-5, rtol=1e-5)


FNA_OPTIONS = [
    {"orthogonal": True},
    {"orthogonal": True, "num_heads": 1},  # one head: W_Q omitted
    {"qk_share": True},
    {"qk_share": True, "orthogonal": True, "num_heads": 1, "num_layers": 1},  # the paper's single layer
    {"learnable_alpha": True},
    {"learnable_bandwidth": True},
    {"manifold": "sphere"},
    {"rescale": False},
    {"alpha": 2.0},
    {"alpha": 0.7, "bandwidth": 3.0},
    {"backend": "reference"},
    {"backend": "tiled"},
    {"attn_dropout": 0.2},
    {"attn_bias": True},
]


@pytest.mark.parametrize("options", FNA_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_fna_option_constructs_and_backprops(options):
    torch.manual_seed(0)
    model = TextClassifier(tiny(pad_id=0, **options)).train()
    ids = torch.randint(1, 30, (4, 8))
    ids[0, 5:] = 0
    loss = torch.nn.functional.cross_entropy(model(ids).logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing
    attn = model.layers[0].self_attn
    if options.get("learnable_alpha"):
        assert attn.alpha_logit.grad.abs().sum() > 0
    if options.get("learnable_bandwidth"):
        assert attn.log_bandwidth.grad.abs().sum() > 0
    if options.get("orthogonal"):
        projections = [p for p in (attn.q_proj, attn.k_proj) if p is not None]
        # One head: W_Q is omitted (as the reference); with qk_share there is no separate W_K.
        assert (attn.q_proj is None) == (attn.num_heads == 1)
        assert (attn.k_proj is None) == bool(options.get("qk_share"))
        for proj in projections:
            torch.testing.assert_close(proj.weight @ proj.weight.T, torch.eye(16), atol=1e-5, rtol=0)
    if options.get("attn_dropout"):
        assert attn.dropout == options["attn_dropout"]


def test_fna_and_softmax_have_the_same_size():
    for kw in ({}, {"pooling": "cls"}, {"qk_share": True}, {"orthogonal": True}):
        fna = count_parameters(TextClassifier(tiny(attention="fna", **kw)))
        soft = count_parameters(TextClassifier(tiny(attention="softmax", **kw)))
        assert fna == soft, kw
    base = count_parameters(TextClassifier(tiny()))
    learnable = count_parameters(TextClassifier(tiny(learnable_alpha=True, learnable_bandwidth=True)))
    assert learnable - base == 2 * 2 * 2  # (alpha, bandwidth) x heads x layers


def test_paper_configurations():
    one = TextClassifier(TextClassifierConfig.single_layer(vocab_size=100, hidden=8))
    attn = one.layers[0].self_attn
    assert (one.config.num_layers, one.config.num_heads, one.config.d_model) == (1, 1, 8)
    assert attn.qk_share and attn.orthogonal and attn.q_proj is None and attn.k_proj is None
    assert one(torch.randint(0, 100, (2, 12))).logits.shape == (2, 2)
    deep = TextClassifierConfig.deep(vocab_size=100)
    assert (deep.num_layers, deep.num_heads, deep.d_model) == (6, 8, 256)


def test_bad_inputs():
    model = TextClassifier(tiny())
    with pytest.raises(ValueError, match="max_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        model(torch.full((1, 4), 30))
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), key_padding_mask=torch.zeros(1, 4))


@pytest.mark.parametrize("max_len,d_model", [(64, 32), (512, 32), (512, 256)])
def test_brownian_positions_squared_distance_grows_like_the_gap(max_len, d_model):
    pe = brownian_positions(max_len, d_model).double()
    gaps = torch.arange(1, max_len)
    for start in (0, max_len // 3):
        ahead = gaps[gaps < max_len - start]
        squared = ((pe[start + ahead] - pe[start]) ** 2).sum(-1)
        ratio = squared / ahead
        assert ratio.min() > 0.75 and ratio.max() < 1.25, (start, ratio.min(), ratio.max())
    # The norms stay within a few percent of each other, so a dot product decays with the gap too.
    norms = pe.norm(dim=-1)
    assert norms.max() / norms.min() < 1.1
    # The standard encodings are not Brownian: their squared distance grows about like
    # log(gap), from gap 2 to gap 32 by 2.8x (d 32) or 4.5x (d 256), not 16x.
    standard = sinusoidal_positions(max_len, d_model).double()
    squared = ((standard[[2, 32]] - standard[0]) ** 2).sum(-1)
    assert squared[1] / squared[0] < 8


def test_brownian_positional_option():
    model = TextClassifier(tiny(positional="brownian", d_model=16))
    torch.testing.assert_close(model.position_embedding, brownian_positions(16, 16))
    assert model(torch.randint(0, 30, (2, 7))).logits.shape == (2, 3)
    assert "position_embedding" not in model.state_dict()  # fixed: a buffer, not saved
    for bad in (15, 2):
        with pytest.raises(ValueError, match=f"brownian positions, got {bad}"):
            tiny(positional="brownian", d_model=bad, num_heads=1)
    with pytest.raises(ValueError, match="positional"):
        tiny(positional="rotary")


# --- ViT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "patches"),
    [
        (ViTConfig.cifar10(d_model=16, num_layers=1, num_heads=2), 64),
        (ViTConfig.grey8(), 16),
        (ViTConfig.grey28(d_model=16, num_layers=1, num_heads=2), 49),
        (ViTConfig.grey28(d_model=16, num_layers=1, num_heads=2, patch_size=7, pooling="mean", norm_first=False), 16),
    ],
)
@pytest.mark.parametrize("attention", ["fna", "softmax"])
def test_vit_shapes(config, patches, attention):
    torch.manual_seed(0)
    model = VisionTransformer(config.replace(attention=attention))
    images = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    out = model(images, output_attentions=True)
    n = patches + (config.pooling == "cls")
    assert out.logits.shape == (2, 10) and out.attentions[0].shape == (2, config.num_heads, n, n)
    assert len(out.attentions) == config.num_layers
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vit_same_size_and_bad_input():
    c = ViTConfig.grey8(learnable_alpha=False)
    assert count_parameters(VisionTransformer(c)) == count_parameters(VisionTransformer(c.replace(attention="softmax")))
    model = VisionTransformer(c)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.long))
