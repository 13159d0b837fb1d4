"""Tiny Hugging Face models (random weights, no downloads) for the integration tests, and the
reference attention implementation ``attn_implementation=REFERENCE`` they are compared with."""

from __future__ import annotations

import copy

import pytest
import torch

from levyattn import fractional_attention

transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")

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


# ----------------------------------------------------------------------------- the reference

REFERENCE = "fna_reference"


def _per_layer(value, layer):
    value = value[layer] if isinstance(value, list) else value
    return torch.tensor(value, dtype=torch.float64) if isinstance(value, list) else value


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **_):
    """FNA as levyattn.fractional_attention(backend="reference") computes it on the q/k/v transformers
    hands over, written apart from the integration: the "fna" implementation is held to it.

    Reads the layer's fna_alpha / fna_bandwidth / fna_density_a from the config (scalars, per-layer
    lists, per-head lists); takes boolean masks (True = keep) or none (then the module's causality).
    """
    config = module.config
    layer = getattr(module, "layer_idx", None)
    layer = getattr(module, "fna_layer_idx", None) if layer is None else layer
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    nq, nk = query.shape[2], key.shape[2]
    if attention_mask is not None:
        assert attention_mask.dtype == torch.bool, "the reference takes boolean masks"
        mask_kw = {"attn_mask": attention_mask[..., :nk]}
    else:
        causal = module.is_causal if is_causal is None else is_causal
        mask_kw = {"is_causal": bool(causal) and nq > 1}
    _, weights = fractional_attention(
        query, key, value, backend="reference", return_weights=True,
        alpha=_per_layer(getattr(config, "fna_alpha", 1.2), layer),
        bandwidth=_per_layer(getattr(config, "fna_bandwidth", 1.0), layer),
        density_a=_per_layer(getattr(config, "fna_density_a", 0.0), layer), **mask_kw,
    )  # fmt: skip
    weights = weights.to(value.dtype)
    dropped = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return (dropped @ value).transpose(1, 2).contiguous(), weights


transformers.AttentionInterface.register(REFERENCE, reference_attention)
masking_utils.AttentionMaskInterface.register(REFERENCE, masking_utils.sdpa_mask)


def as_reference(model):
    """A copy of ``model`` (same weights and config) that runs the reference attention."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(REFERENCE)
    return reference


def tiny_t5(num_layers: int = 2, num_decoder_layers: int = 3, seed: int = 0):
    """A T5 with encoder and decoder of different depths (softmax attention, eval mode)."""
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=num_layers, num_decoder_layers=num_decoder_layers,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def tiny_llava(seed: int = 0):
    """A Llava: a 3-layer CLIP vision tower and a 2-layer Llama, each with its own sub-config.

    Returns (model, inputs): 4 image tokens (id VOCAB - 1) per sequence and their pixels."""
    torch.manual_seed(seed)
    text = tiny_config("llama")
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = transformers.LlavaConfig(
        text_config=text, vision_config=vision, image_token_id=VOCAB - 1, projector_hidden_act="gelu",
        vision_feature_layer=-1,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (2, 10), generator=g)
    ids[:, 1:5] = VOCAB - 1
    return model, {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
