"""Tiny Hugging Face models (random weights, no downloads) for the integration tests."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import levyattn.integrations.huggingface  # noqa: E402,F401  (registers "fna")

VOCAB = 40
DECODERS = ("gpt2", "llama")
FAMILIES = ("bert", "gpt2", "llama", "vit")

_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DEFAULTS = {
    "bert": (
        "BertConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
            embd_pdrop=0.0, **_SPECIAL,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=64, **_SPECIAL,
        ),
    ),
    "vit": (
        "ViTConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
            patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
    ),
}


def tiny_config(family: str, **overrides):
    """A 2-layer config of one family: hidden 32, 2 heads (Llama 4 query / 2 kv heads), no dropout."""
    name, defaults = _DEFAULTS[family]
    return getattr(transformers, name)(**{**defaults, **overrides})
