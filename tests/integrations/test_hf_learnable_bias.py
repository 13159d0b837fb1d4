"""T5 with attn_implementation="fna" trains its relative position bias on every backend.

T5 adds a learned relative position bias to the attention scores; levyattn receives it as a
float ``attn_mask`` that requires grad. The tiled backend (and ``auto``, which picks it) once
dropped that gradient, so the bias never trained.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import VOCAB, transformers

from levyattn.integrations import huggingface as hf


def t5_bias_gradients(backend: str, alpha: float) -> dict[str, torch.Tensor]:
    """Gradients of the encoder's and decoder's relative_attention_bias after one loss."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        attn_implementation="fna",
    )  # fmt: skip
    hf.configure_fna(config, alpha=alpha, backend=backend)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).to(torch.float64)
    assert model.config._attn_implementation == "fna"
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(3, VOCAB, (2, 7), generator=g), torch.randint(3, VOCAB, (2, 5), generator=g)
    model(input_ids=ids, labels=labels).loss.backward()
    return {
        name: param.grad for name, param in model.named_parameters() if name.endswith("relative_attention_bias.weight")
    }


@pytest.mark.parametrize("backend, alpha", [("tiled", 1.2), ("auto", 1.2), ("auto", 2.0), ("sdpa", 2.0)])
def test_t5_relative_position_bias_gets_the_reference_gradient(monkeypatch, backend, alpha):
    monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)  # the fused kernel where it applies
    reference = t5_bias_gradients("reference", alpha)
    got = t5_bias_gradients(backend, alpha)
    assert len(reference) == 2  # encoder and decoder
    for name, want in reference.items():
        assert got[name] is not None, f"{name}: no gradient"
        assert want.abs().max() > 0
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-12)
