"""Configs, the registry and checkpoint-style rebuilds for every model type."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from levyattn.models import (
    CONFIG_TYPES,
    MODEL_TYPES,
    CausalLMConfig,
    ModelOutput,
    Seq2SeqConfig,
    Seq2SeqOutput,
    TextClassifierConfig,
    ViTConfig,
    build_model,
)

TINY = {
    "text_classifier": TextClassifierConfig(vocab_size=20, d_model=8, num_heads=2, max_len=12),
    "vit": ViTConfig.grey8(d_model=8, num_layers=1, num_heads=2),
    "seq2seq": Seq2SeqConfig(src_vocab_size=15, tgt_vocab_size=15, d_model=8, num_heads=2, num_encoder_layers=1,
                             num_decoder_layers=1, max_len=16),
    "lm": CausalLMConfig(vocab_size=15, block_size=16, d_model=8, num_heads=2, num_layers=1),
}  # fmt: skip


def _example_input(model_type: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    if model_type == "vit":
        return (torch.randn(2, 1, 8, 8, generator=g),)
    if model_type == "seq2seq":
        return (torch.randint(3, 15, (2, 5), generator=g), torch.randint(3, 15, (2, 4), generator=g))
    return (torch.randint(1, 15, (2, 6), generator=g),)


def test_registry_lists_every_model():
    assert set(MODEL_TYPES) == {"text_classifier", "vit", "seq2seq", "lm"} == set(CONFIG_TYPES)
    for name, cls in MODEL_TYPES.items():
        assert cls.model_type == name


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_config_json_round_trip_and_rebuild(model_type):
    torch.manual_seed(0)
    config = TINY[model_type]
    data = json.loads(json.dumps(config.to_dict()))
    assert CONFIG_TYPES[model_type].from_dict(data) == config
    model = build_model(model_type, data).eval()
    assert model.model_type == model_type and model.config == config
    # What a checkpoint does: rebuild from (model_type, config dict), load the weights strictly.
    twin = build_model(model_type, model.config.to_dict()).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    args = _example_input(model_type)
    torch.testing.assert_close(twin(*args).logits, model(*args).logits)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_one_calling_convention(model_type):
    """Every model returns a ModelOutput, attentions only on request; padding masks are
    named ``*key_padding_mask`` (True = padding) everywhere."""
    torch.manual_seed(0)
    model = build_model(model_type, TINY[model_type]).eval()
    args = _example_input(model_type)
    plain = model(*args)
    assert isinstance(plain, ModelOutput) and plain.attentions is None
    out = model(*args, output_attentions=True)
    assert isinstance(out, Seq2SeqOutput if model_type == "seq2seq" else ModelOutput)
    torch.testing.assert_close(out.logits, plain.logits)
    layers = TINY[model_type].num_decoder_layers if model_type == "seq2seq" else TINY[model_type].num_layers
    assert isinstance(out.attentions, tuple) and len(out.attentions) == layers
    for w in out.attentions:
        assert w.dim() == 4
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    masks = [name for name in inspect.signature(model.forward).parameters if "mask" in name]
    assert masks == {"vit": [], "seq2seq": ["src_key_padding_mask", "tgt_key_padding_mask"]}.get(
        model_type, ["key_padding_mask"]
    )
    with pytest.raises(TypeError, match="need_weights"):
        model(*args, need_weights=True)


def test_build_model_rejects_unknown_type_and_foreign_config():
    with pytest.raises(ValueError, match="unknown model_type 'resnet'"):
        build_model("resnet", {})
    # A seq2seq checkpoint's config handed to the LM: fields that do not exist there.
    with pytest.raises(ValueError, match="unknown CausalLMConfig field"):
        build_model("lm", TINY["seq2seq"].to_dict())
    with pytest.raises(ValueError, match="needs a CausalLMConfig"):
        build_model("lm", TINY["vit"])
    with pytest.raises(ValueError, match="model_type 'text_classifier'"):
        build_model("text_classifier", {})  # vocab_size missing


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"d_model": 0}, "d_model"),
        ({"num_heads": 3}, "num_heads"),
        ({"alpha": 2.5}, "alpha"),
        ({"bandwidth": -1.0}, "bandwidth"),
        ({"pooling": "max"}, "pooling"),
        ({"dropout": 1.0}, "dropout"),
        ({"attn_dropout": -0.1}, "attn_dropout"),
        ({"attention": "linear"}, "attention"),
        ({"manifold": "torus"}, "manifold"),
        ({"backend": "cuda"}, "backend"),
        ({"pad_id": 20}, "pad_id"),
    ],
)
def test_invalid_config_names_field_and_value(changes, field):
    with pytest.raises(ValueError, match=field) as err:
        TINY["text_classifier"].replace(**changes)
    assert str(next(iter(changes.values()))) in str(err.value)


def test_invalid_types_and_cross_field_checks():
    with pytest.raises(TypeError, match="qk_share"):
        TINY["lm"].replace(qk_share="yes")
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="must differ"):
        TINY["seq2seq"].replace(bos_id=0)
    with pytest.raises(ValueError, match="share_embeddings"):
        TINY["seq2seq"].replace(share_embeddings=True, src_vocab_size=30)
    with pytest.raises(ValueError, match="decoder_attention"):
        TINY["seq2seq"].replace(decoder_attention="none")


def test_block_defaults_of_each_model():
    """TransformerOptions holds the shared fields; each model keeps its own defaults."""
    names = ("d_model", "num_heads", "dim_feedforward", "dropout", "activation", "layer_norm_eps")
    defaults = [
        (TextClassifierConfig(vocab_size=5), (64, 1, None, 0.1, "relu", 1e-6)),
        (ViTConfig(), (128, 4, None, 0.1, "gelu", 1e-6)),
        (Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=5), (256, 8, None, 0.1, "relu", 1e-6)),
        (CausalLMConfig(vocab_size=5), (128, 4, None, 0.0, "gelu", 1e-5)),
    ]
    for config, expected in defaults:
        assert tuple(getattr(config, n) for n in names) == expected, type(config).__name__
        assert config.ffn_dim == 4 * config.d_model
    with pytest.raises(TypeError, match="config must be a ViTConfig or a dict, got CausalLMConfig"):
        MODEL_TYPES["vit"](CausalLMConfig(vocab_size=5))
