"""The registered "fna" attention function against levyattn's reference operator, and the config keys."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import tiny_config, transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn import FNAConfig, fractional_attention
from levyattn.integrations import huggingface as hf


class Stub(torch.nn.Module):
    """What transformers' attention modules expose to the attention function."""

    def __init__(self, config, layer_idx=0, is_causal=False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal
        self.scaling = 0.125


def _config(**fna):
    cfg = tiny_config("llama")
    hf.configure_fna(cfg, **fna)
    return cfg


def _reference(q, k, v, **kw):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return fractional_attention(q, k, v, backend="reference", **kw)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    rep=st.sampled_from([1, 2]),
    nq=st.integers(1, 6),
    extra_keys=st.integers(0, 3),
    mask_kind=st.sampled_from(["none", "bool", "float", "causal"]),
    alpha=st.sampled_from([0.7, 1.2, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_agrees_with_reference_operator(batch, kv_heads, rep, nq, extra_keys, mask_kind, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    heads, nk, d = kv_heads * rep, nq + extra_keys, 8
    q = torch.randn(batch, heads, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, nk, d, generator=g, dtype=torch.float64)
    module = Stub(_config(alpha=alpha, bandwidth=0.7), is_causal=False)
    keep = torch.rand(batch, 1, nq, nk, generator=g) > 0.3
    keep[..., 0] = True  # every query keeps a key
    mask, expected_kw = None, {}
    if mask_kind == "bool":
        mask, expected_kw = keep, {"attn_mask": keep}
    elif mask_kind == "float":
        # HF's eager format: 0 where kept, finfo.min where masked.
        mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
        expected_kw = {"attn_mask": keep}
    elif mask_kind == "causal":
        module.is_causal = True
        k, v = k[:, :, :nq], v[:, :, :nq]  # a causal call without a mask has Nq == Nk
        expected_kw = {"is_causal": nq > 1}
    out, weights = hf.fna_attention_forward(module, q, k, v, mask, scaling=0.3, output_attentions=True)
    ref_out, ref_w = _reference(q, k, v, alpha=alpha, bandwidth=0.7, return_weights=True, **expected_kw)
    assert out.shape == (batch, nq, heads, d)  # transformers' layout: (B, L, H, d)
    torch.testing.assert_close(out, ref_out.transpose(1, 2))
    torch.testing.assert_close(weights, ref_w)


def test_weights_only_when_asked_and_backend_from_config():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 5, 8) for _ in range(3))
    module = Stub(_config(backend="tiled"))
    out, weights = hf.fna_attention_forward(module, q, k, v, None)
    assert weights is None
    torch.testing.assert_close(out, _reference(q, k, v).transpose(1, 2), rtol=1e-5, atol=1e-6)
    module.config.fna_backend = "sdpa"  # alpha = 1.2 cannot go through sdpa: the named backend must refuse
    with pytest.raises(ValueError, match="sdpa"):
        hf.fna_attention_forward(module, q, k, v, None)


def test_scaling_is_ignored():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    module = Stub(_config())
    a, _ = hf.fna_attention_forward(module, q, k, v, None, scaling=0.01)
    b, _ = hf.fna_attention_forward(module, q, k, v, None, scaling=10.0)
    torch.testing.assert_close(a, b)


def test_per_layer_and_per_head_values_reach_the_layer():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 4, 6, 8) for _ in range(3))
    per_head = [1.0, 1.5, 2.0, 0.5]
    cfg = _config(alpha=[1.2, per_head], bandwidth=[2.0, [0.5, 1.0, 1.5, 2.0]], density_a=[0.0, 0.5])
    out0, _ = hf.fna_attention_forward(Stub(cfg, layer_idx=0), q, k, v, None)
    out1, _ = hf.fna_attention_forward(Stub(cfg, layer_idx=1), q, k, v, None)
    torch.testing.assert_close(out0, _reference(q, k, v, alpha=1.2, bandwidth=2.0).transpose(1, 2))
    expected1 = _reference(
        q, k, v, alpha=torch.tensor(per_head), bandwidth=torch.tensor([0.5, 1.0, 1.5, 2.0]), density_a=0.5
    )
    torch.testing.assert_close(out1, expected1.transpose(1, 2))


@pytest.mark.parametrize("where", ["causal", "decoder cross-attention", "causal call"])
def test_density_normalisation_is_refused_where_attention_is_causal(where):
    q, k, v = (torch.randn(1, 4, 6, 8) for _ in range(3))
    module = Stub(_config(density_a=0.25), is_causal=where == "causal")
    if where == "decoder cross-attention":
        module.is_decoder = True  # T5's cross-attention: not causal itself, but its queries are
    with pytest.raises(ValueError, match="fna_density_a = 0.25.*decoder"):
        hf.fna_attention_forward(module, q, k, v, None, is_causal=True if where == "causal call" else None)
    hf.fna_attention_forward(Stub(_config(density_a=0.25)), q, k, v, None)  # an encoder keeps it


def test_config_edits_take_effect_on_the_next_call():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 4, 6, 8) for _ in range(3))
    module = Stub(_config(alpha=1.2))
    first, _ = hf.fna_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(first, _reference(q, k, v, alpha=1.2).transpose(1, 2))
    module.config.fna_alpha = 0.6
    second, _ = hf.fna_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(second, _reference(q, k, v, alpha=0.6).transpose(1, 2))
    assert not torch.allclose(first, second)


def test_causal_flag_with_an_empty_static_cache_uses_the_first_keys():
    # transformers' sdpa convention: no mask, is_causal, more key slots than queries -> the
    # extra (future, empty) slots are dropped.
    torch.manual_seed(4)
    q = torch.randn(1, 2, 4, 8)
    k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out, _ = hf.fna_attention_forward(Stub(_config(), is_causal=True), q, k, v, None)
    expected = _reference(q, k[:, :, :4], v[:, :, :4], is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_long_mask_is_cut_to_the_keys_and_position_bias_is_added():
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    keep = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    keep[..., 1] = False
    bias = torch.randn(1, 2, 3, 3)
    out, _ = hf.fna_attention_forward(Stub(_config()), q, k, v, keep, position_bias=bias)
    expected = _reference(q, k, v, attn_mask=bias.masked_fill(~keep[..., :3], float("-inf")))
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_dropout_applies_to_the_weights_in_training_only():
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    module = Stub(_config())
    module.train()
    torch.manual_seed(7)
    out, _ = hf.fna_attention_forward(module, q, k, v, None, dropout=0.5)
    _, weights = _reference(q, k, v, return_weights=True)
    torch.manual_seed(7)
    expected = torch.nn.functional.dropout(weights, p=0.5, training=True) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2))
    module.eval()
    out_eval, _ = hf.fna_attention_forward(module, q, k, v, None, dropout=0.5)
    torch.testing.assert_close(out_eval, (weights @ v).transpose(1, 2))


def test_bad_calls_raise():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    module = Stub(_config())
    with pytest.raises(ValueError, match="multiple"):
        hf.fna_attention_forward(module, q, k, k, None)
    with pytest.raises(ValueError, match="softcap"):
        hf.fna_attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match=r"attention sinks \(s_aux\)"):
        hf.fna_attention_forward(module, q, q, q, None, s_aux=torch.zeros(3))
    with pytest.raises(ValueError, match=r"attention sinks \(sinks\)"):
        hf.fna_attention_forward(module, q, q, q, None, sinks=torch.zeros(1, 3, 4, 1))
    with pytest.raises(TypeError, match="attention_mask"):
        hf.fna_attention_forward(module, q, q, q, [[1, 0]])
    with pytest.raises(TypeError, match="attention_mask"):
        hf.fna_attention_forward(module, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"alpha": 2.5}, ValueError, r"fna_alpha.*\(0, 2\]"),
        ({"alpha": [1.2]}, ValueError, "fna_alpha has 1 entries.*num_hidden_layers=2"),
        ({"alpha": [1.2, [1.0, 1.0]]}, ValueError, r"fna_alpha\[1\] has 2 entries.*num_attention_heads=4"),
        ({"alpha": [1.2, [1.0, 1.0, 3.0, 1.0]]}, ValueError, r"fna_alpha\[1\]\[2\]"),
        ({"bandwidth": 0.0}, ValueError, "fna_bandwidth.*> 0"),
        ({"bandwidth": torch.ones(4)}, TypeError, "tensor"),
        ({"manifold": "hyperbolic"}, ValueError, "manifold must be one of"),
        ({"manifold": ["sphere", ["sphere"]]}, TypeError, "per-head"),
        ({"rescale": 1}, TypeError, "fna_rescale: rescale must be a bool"),
        ({"density_a": 1.5}, ValueError, r"density_a.*\[0, 1\]"),
        ({"backend": "cuda"}, ValueError, "fna_backend must be one of"),
        ({"backend": ["auto", "auto"]}, TypeError, "whole model"),
        ({"temperature": 1.0}, TypeError, "unknown setting 'temperature'"),
    ],
)
def test_config_validation(settings, error, match):
    cfg = tiny_config("llama")
    with pytest.raises(error, match=match):
        hf.configure_fna(cfg, **settings)
    assert not hasattr(cfg, "fna_alpha") or cfg.fna_alpha == 1.2  # nothing half-written


def test_validate_reads_defaults_and_catches_bad_values_from_disk():
    cfg = tiny_config("bert")
    values = hf.validate_fna_config(cfg)
    assert values == hf.CONFIG_KEYS
    cfg.fna_alpha = "1.2"  # e.g. a hand-edited config.json
    with pytest.raises(TypeError, match="fna_alpha"):
        hf.validate_fna_config(cfg)


def test_config_defaults_are_fnaconfigs_and_fractional_attentions():
    assert hf.CONFIG_KEYS == {
        "fna_alpha": 1.2,
        "fna_bandwidth": 1.0,
        "fna_manifold": "euclidean",
        "fna_rescale": True,
        "fna_d_intrinsic": None,
        "fna_sphere_radius": 1.0,
        "fna_density_a": 0.0,
        "fna_backend": "auto",
    }
    kernel = FNAConfig().to_dict()
    assert {k: v for k, v in hf.CONFIG_KEYS.items() if k != "fna_backend"} == {
        f"fna_{name}": value for name, value in kernel.items() if name != "exclude_self"
    }


def test_register_returns_the_name_and_the_model_runs_under_it():
    assert hf.register() == hf.ATTN_IMPLEMENTATION == "fna"
    name = hf.register("fna_renamed")
    assert name == "fna_renamed"
    torch.manual_seed(0)
    config = _config(bandwidth=1e-3)
    ids = torch.randint(3, 40, (1, 6))
    with torch.no_grad():
        renamed = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name).eval()
        fna = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fna").eval()
        fna.load_state_dict(renamed.state_dict())
        torch.testing.assert_close(renamed(ids).logits, fna(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="name"):
        hf.register("")


def test_per_layer_values_need_a_layer_index():
    cfg = _config(alpha=[1.2, 1.5])
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="assign_layer_indices"):
        hf.fna_attention_forward(Stub(cfg, layer_idx=None), q, q, q, None)
    assert hf.layer_settings(cfg, 1, 4)["alpha"] == 1.5


def test_finfo_min_mask_removes_pairs_exactly_and_empty_rows_give_zero():
    # A row with every key at finfo.min would be uniform under an additive softmax; FNA treats
    # finfo.min as -inf, so it is exactly the boolean mask: the pair is gone, the empty row is 0.
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    keep = torch.tensor([[True, False, True], [False, False, False], [True, True, False]]).reshape(1, 1, 3, 3)
    additive = torch.zeros(1, 1, 3, 3).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = Stub(_config())
    out_f, w_f = hf.fna_attention_forward(module, q, k, v, additive, output_attentions=True)
    out_b, w_b = hf.fna_attention_forward(module, q, k, v, keep, output_attentions=True)
    torch.testing.assert_close(out_f, out_b)
    torch.testing.assert_close(w_f, w_b)
    assert torch.all(out_f[:, 1] == 0) and torch.all(w_f[:, :, 1] == 0)
    assert torch.all(w_f[..., ~keep[0, 0]] == 0)


def test_the_private_output_collector_of_transformers_is_found():
    # Whether a v5 forward pass records attention weights is known only from transformers' private
    # ``_active_collector`` (no public API says it; GPT-2 drops ``output_attentions`` before its
    # layers). Where transformers has its output-capturing module, hf_attention must have found the
    # collector in it: a rename fails here, loudly, instead of weights going silently missing.
    import importlib.util

    from levyattn.integrations import hf_attention

    if importlib.util.find_spec("transformers.utils.output_capturing") is None:
        pytest.skip("this transformers records outputs without transformers.utils.output_capturing")
    assert hf_attention._active_collector is not None, (
        "transformers.utils.output_capturing no longer has _active_collector: update "
        "levyattn.integrations.hf_attention._weights_requested"
    )
    assert callable(hf_attention._active_collector.get)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2"), attn_implementation="fna").eval()
    with torch.no_grad():
        weights = model(torch.tensor([[3, 4, 5]]), output_attentions=True).attentions
    assert len(weights) == 2 and all(w.shape == (1, 2, 3, 3) for w in weights)
