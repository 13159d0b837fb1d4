"""The lens on a model whose attention is FNA: it measures FNA's weights, not a softmax of the same q/k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from levyattn.integrations.huggingface import configure_fna, to_fna  # noqa: E402
from levyattn.lens import measure_decay  # noqa: E402
from levyattn.lens.capture import FNA_ROWS_IMPLEMENTATION, capture_rows  # noqa: E402

KW = dict(distances=[10, 30, 60], n_prompts=2, seeds=(42,), batch_size=2)


def _llama(**fna) -> torch.nn.Module:
    torch.manual_seed(11)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        max_position_embeddings=512, vocab_size=2000, initializer_range=0.2,
    )  # fmt: skip
    model = transformers.LlamaModel(config).eval()
    if fna:
        configure_fna(model, **fna)
        model.set_attn_implementation("fna")
    else:
        to_fna(model, alpha=1.2, bandwidth=2.0)  # no calibration: the conversion as a user runs it
    return model


def _bert_fna(**fna) -> torch.nn.Module:
    torch.manual_seed(12)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=512, vocab_size=2000, initializer_range=0.2,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    configure_fna(model, **{"alpha": 0.8, "bandwidth": 1.5, **fna})
    model.set_attn_implementation("fna")
    return model


MODELS = {
    "llama to_fna": lambda: _llama(),
    "llama per-layer, per-head": lambda: _llama(
        alpha=[1.5, [0.6, 1.0, 1.4, 2.0]], bandwidth=[[1.0, 2.0, 3.0, 4.0], 2.5]
    ),
    "llama sphere": lambda: _llama(manifold="sphere", alpha=1.1),
    # Column sums over every query; decoders refuse density normalisation (later tokens would leak).
    "bert density": lambda: _bert_fna(density_a=0.5),
    "bert": _bert_fna,
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_captured_rows_are_the_fna_weights_the_model_returns(name, padded):
    model = MODELS[name]()
    ids = torch.randint(3, 2000, (2, 70))
    mask = torch.ones_like(ids)
    if padded:  # the model's padding mask instead of its causal flag
        mask[1, :6] = 0
    rows = torch.tensor([0, 9, 40, 69])
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, output_attentions=True)  # FNA's reference-kernel weights
        model.set_attn_implementation(FNA_ROWS_IMPLEMENTATION)
        captured: list[torch.Tensor] = []
        with capture_rows(rows, captured.append) as capture:
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("fna")
    assert capture.calls == len(own.attentions) == len(captured) == 2
    torch.testing.assert_close(out, own.last_hidden_state, rtol=1e-5, atol=1e-5)  # the model's own FNA pass
    for a, c in zip(own.attentions, captured):
        assert c.shape == (2, 4 if "llama" in name else 2, 4, 70)
        torch.testing.assert_close(c, a[:, :, rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama per-layer, per-head", "bert density", "bert"])
def test_measure_decay_reads_fna_not_softmax(name):
    model = MODELS[name]()
    rows = measure_decay(model, **KW)
    eager = measure_decay(model, capture="eager", **KW)
    assert model.config._attn_implementation == "fna"  # restored
    assert rows.info["attention_path"] == "rows" and eager.info["attention_path"] == "eager"
    assert rows.info["fna_attention"] and eager.info["fna_attention"]
    # FNA's density normalisation sums over later queries too: no one-pass shortcut
    assert rows.passes == ("one" if rows.causal and name != "bert density" else "per_distance")
    np.testing.assert_allclose(rows.prompt_layer, eager.prompt_layer, rtol=1e-5, atol=1e-8)

    # The model's own output_attentions, read by hand: query d + 49, key 49 of the first d + 50 tokens.
    ids = torch.as_tensor(_prompts(model, max(KW["distances"]) + 50))
    expected = []
    with torch.no_grad():
        for d in KW["distances"]:
            weights = model(input_ids=ids[:, : d + 50], output_attentions=True).attentions
            expected.append(np.mean([a[:, :, d + 49, 49].mean(1).numpy() for a in weights], axis=0))
    np.testing.assert_allclose(rows.prompt_values[0], np.stack(expected, -1), rtol=1e-5, atol=1e-8)

    # A softmax model on the same weights measures something else.
    model.set_attn_implementation("sdpa")
    softmax = measure_decay(model, **KW)
    assert not softmax.info["fna_attention"]
    assert np.max(np.abs(softmax.aggregate - rows.aggregate) / rows.aggregate) > 0.05


def _prompts(model, length):
    from levyattn.lens.prompts import make_prompts

    prompts, _ = make_prompts("random", None, model, None)
    return prompts.draw(42, KW["n_prompts"], length)


def test_one_pass_is_refused_under_fna_density_normalisation():
    # A decoder with density normalisation: the lens or the attention itself refuses it.
    model = _llama(alpha=1.2, bandwidth=2.0, density_a=0.5)
    with pytest.raises(ValueError, match="density"):
        measure_decay(model, passes="one", **KW)
    assert model.config._attn_implementation == "fna"


def test_a_saved_fna_model_is_loaded_and_measured_as_fna(tmp_path):
    """transformers does not save attn_implementation: the lens reads the fna_* keys of the config."""
    model = MODELS["llama to_fna"]()
    model.save_pretrained(tmp_path)
    from_dir = measure_decay(str(tmp_path), **KW)
    in_memory = measure_decay(model, **KW)
    assert from_dir.info["fna_attention"] and from_dir.info["attention_path"] == "rows"
    np.testing.assert_allclose(from_dir.prompt_layer, in_memory.prompt_layer, rtol=1e-5, atol=1e-8)
