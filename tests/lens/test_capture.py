"""Row capture: the lens's registered attention against the eager path it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from levyattn.lens import DenseOptions, measure_decay  # noqa: E402
from levyattn.lens.capture import ROWS_IMPLEMENTATION, capture_rows, row_weights  # noqa: E402

_SMALL = dict(vocab_size=2000, initializer_range=0.2)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        max_position_embeddings=512, **_SMALL,
    ),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=512, **_SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=512, **_SMALL,
    ),
    # sliding window shorter than the passes, and logit softcapping (which SDPA cannot apply)
    "gemma2": lambda: transformers.Gemma2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, max_position_embeddings=512, sliding_window=40, attn_logit_softcapping=5.0,
        **_SMALL,
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=128,
        max_position_embeddings=512, sliding_window=40, **_SMALL,
    ),
    "bert": lambda: transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=512, **_SMALL,
    ),
}
KW = dict(distances=[10, 30, 60, 120], n_prompts=3, seeds=(42, 7), batch_size=2)


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(5)
    return transformers.AutoModel.from_config(CONFIGS[family]()).eval()  # sdpa, or eager where it has no sdpa


def _close(rows, eager) -> None:
    """Same A(d) per prompt, layer and head, to float32 rounding (the outputs come from fused SDPA)."""
    np.testing.assert_allclose(rows.prompt_layer, eager.prompt_layer, rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(rows.layer_head, eager.layer_head, rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(rows.aggregate, eager.aggregate, rtol=5e-6)


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("protocol", ["published", "dense"])
def test_rows_equal_eager(family, protocol):
    model = _model(family)
    impl = model.config._attn_implementation
    rows = measure_decay(model, protocol=protocol, **KW)
    assert model.config._attn_implementation == impl  # restored
    eager = measure_decay(model, protocol=protocol, capture="eager", **KW)
    assert rows.info["attention_path"] == "rows" and eager.info["attention_path"] == "eager"
    assert rows.causal == eager.causal == (family != "bert")
    assert rows.passes == eager.passes and rows.n_passes == eager.n_passes
    np.testing.assert_array_equal(rows.pair_counts, eager.pair_counts)
    _close(rows, eager)


def test_rows_per_distance_equal_eager():
    model = _model("llama")
    rows = measure_decay(model, passes="per_distance", **KW)
    eager = measure_decay(model, passes="per_distance", capture="eager", **KW)
    _close(rows, eager)


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_outputs_stay_those_of_the_model(family):
    """Under the row-capturing attention the model computes what it computes with its eager attention."""
    model = _model(family)
    ids = torch.randint(3, 2000, (2, 90))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model(input_ids=ids, output_attentions=True)
        model.set_attn_implementation(ROWS_IMPLEMENTATION)
        captured: list[torch.Tensor] = []
        rows = torch.tensor([0, 17, 89])
        with capture_rows(rows, captured.append) as capture:
            got = model(input_ids=ids).last_hidden_state
    assert capture.calls == len(expected.attentions) == len(captured)
    torch.testing.assert_close(got, expected.last_hidden_state, rtol=1e-5, atol=2e-5)
    for a, c in zip(expected.attentions, captured):
        torch.testing.assert_close(c, a[:, :, rows], rtol=1e-5, atol=1e-7)


def test_unhookable_model_keeps_the_eager_path():
    torch.manual_seed(3)
    bloom = transformers.BloomModel(transformers.BloomConfig(n_layer=2, n_head=2, hidden_size=64, vocab_size=2000))
    meas = measure_decay(bloom.eval(), distances=[30, 60], n_prompts=1, seeds=(42,))
    assert meas.info["attention_path"] == "eager"
    assert "does not dispatch through transformers' attention functions" in meas.info["attention_path_note"]
    assert bloom.config._attn_implementation != ROWS_IMPLEMENTATION


def _softmax_reference(q, k, mask, scale, softcap=None, bias=None):
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:
        logits = logits + bias.double()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return torch.softmax(logits, -1)


def test_row_weights_masks_bias_softcap_gqa():
    torch.manual_seed(0)
    b, h, hkv, n, d = 2, 4, 2, 12, 8
    q, k = torch.randn(b, h, n, d) * 3, torch.randn(b, hkv, n, d) * 3
    k_full = k.repeat_interleave(h // hkv, dim=1)
    rows = torch.tensor([0, 5, 11])
    keep = torch.rand(b, 1, n, n) > 0.3
    keep[..., 0] = True  # every row keeps a key
    bias = torch.randn(1, h, n, n)
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    cases = [
        (dict(attention_mask=keep), _softmax_reference(q, k_full, keep, 0.5)),
        (dict(attention_mask=additive), _softmax_reference(q, k_full, keep, 0.5)),
        (dict(attention_mask=keep, softcap=2.0), _softmax_reference(q, k_full, keep, 0.5, softcap=2.0)),
        (dict(attention_mask=keep, position_bias=bias), _softmax_reference(q, k_full, keep, 0.5, bias=bias)),
        (dict(attention_mask=None, causal=True), _softmax_reference(q, k_full, torch.ones(n, n).tril().bool(), 0.5)),
    ]
    for kwargs, full in cases:
        kwargs.setdefault("causal", False)
        got = row_weights(q, k, kwargs.pop("attention_mask"), rows, scaling=0.5, **kwargs)
        assert got.dtype == torch.float32 and got.shape == (b, h, 3, n)
        torch.testing.assert_close(got.double(), full[:, :, rows], rtol=1e-5, atol=1e-7)


def test_row_weights_finite_and_float64():
    q = torch.full((1, 1, 3, 4), 1e4, dtype=torch.float64)
    k = torch.full((1, 1, 3, 4), 1e4, dtype=torch.float64)
    none_kept = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    w = row_weights(q, k, none_kept, torch.arange(3), causal=False)
    assert w.dtype == torch.float64 and torch.equal(w, torch.zeros_like(w))  # a row with no key: zeros, not NaN
    w = row_weights(q, k, None, torch.arange(3), causal=True)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 3, dtype=torch.float64))


def test_dense_encoder_both_directions_rows_equal_eager():
    model = _model("bert")
    opts = DenseOptions(direction="both", normalize="renorm")
    rows = measure_decay(model, protocol="dense", dense=opts, **KW)
    eager = measure_decay(model, protocol="dense", dense=opts, capture="eager", **KW)
    _close(rows, eager)


def test_a_failing_probe_falls_back_to_eager(monkeypatch):
    import contextlib

    import levyattn.lens.capture as capture_module

    @contextlib.contextmanager
    def broken(rows, consume):
        raise RuntimeError("no rows today")
        yield  # pragma: no cover

    monkeypatch.setattr(capture_module, "capture_rows", broken)
    model = _model("llama")
    meas = measure_decay(model, distances=[10, 30], n_prompts=1, seeds=(42,))
    assert meas.info["attention_path"] == "eager" and "no rows today" in meas.info["attention_path_note"]
    assert model.config._attn_implementation == "sdpa"


def test_row_weights_refuses_heads_not_a_multiple_of_kv_heads():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 3, 3, 8)  # 4 * 3 rows would reshape to 3 kv heads silently
    with pytest.raises(ValueError, match="4 heads, not a multiple of the key's 3 heads"):
        row_weights(q, k, None, torch.arange(3), causal=True)


def test_one_probe_pass_chooses_the_path_and_detects_causality():
    """Passes of the backbone: the probe, then one per prompt (the probe's rows are reused for causality)."""
    model = _model("llama")
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        meas = measure_decay(model, distances=[10, 30], n_prompts=2, seeds=(42,), batch_size=1)
    finally:
        handle.remove()
    assert meas.causal and meas.info["attention_path"] == "rows" and meas.n_passes == 2
    assert len(calls) == 1 + meas.n_passes
