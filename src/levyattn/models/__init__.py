"""Models built on FNA (or softmax, for controlled comparisons): one readable file each.

=================  =========================  ==================================================
model_type         class (config)             call -> ``ModelOutput.logits``
=================  =========================  ==================================================
"text_classifier"  TextClassifier             input_ids (B, L), key_padding_mask -> (B, C)
                   (TextClassifierConfig)
"vit"              VisionTransformer          images (B, C, H, W) -> (B, num_classes)
                   (ViTConfig)
"seq2seq"          Seq2SeqTransformer         src_ids, tgt_in_ids, src_key_padding_mask,
                   (Seq2SeqConfig)            tgt_key_padding_mask -> (B, T, V); generate
"lm"               CausalLM (CausalLMConfig)  input_ids (B, L), key_padding_mask -> (B, L, V);
                                              generate
=================  =========================  ==================================================

Every model has a class attribute ``model_type`` and an instance attribute ``config``
(a validated dataclass with ``to_dict()`` / ``from_dict()``); a checkpoint stores both,
and :func:`build_model` rebuilds the model from them.

One calling convention: every ``forward`` returns a :class:`ModelOutput` (``.logits``, and
``.attentions``, one (B, H, L, S) tensor per layer, when called with
``output_attentions=True``; a :class:`Seq2SeqOutput` adds the encoder and cross-attention
weights). Padding masks are (B, L) bool, True = padding, named as ``nn.Transformer`` names
them: ``key_padding_mask``, or ``src_key_padding_mask`` / ``tgt_key_padding_mask``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from levyattn.config import did_you_mean
from levyattn.models.classifier import TextClassifier, TextClassifierConfig
from levyattn.models.common import (
    AttentionOptions,
    ModelConfig,
    ModelOutput,
    Seq2SeqOutput,
    TransformerOptions,
    count_parameters,
)
from levyattn.models.lm import CausalLM, CausalLMConfig, sample_next
from levyattn.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, sequence_loss
from levyattn.models.vit import VisionTransformer, ViTConfig

MODEL_TYPES: dict[str, type[nn.Module]] = {
    "text_classifier": TextClassifier,
    "vit": VisionTransformer,
    "seq2seq": Seq2SeqTransformer,
    "lm": CausalLM,
}

CONFIG_TYPES: dict[str, type[ModelConfig]] = {
    "text_classifier": TextClassifierConfig,
    "vit": ViTConfig,
    "seq2seq": Seq2SeqConfig,
    "lm": CausalLMConfig,
}


def build_model(model_type: str, config: dict[str, Any] | ModelConfig) -> nn.Module:
    """A fresh model of ``model_type`` (a key of ``MODEL_TYPES``) from its config dict
    (``config.to_dict()``, as checkpoints store it) or config object.

    Raises ValueError for an unknown model type, for a config of another model type and
    for unknown or invalid config fields.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unknown model_type {model_type!r}{did_you_mean(model_type, MODEL_TYPES)} "
            f"(valid model types are {sorted(MODEL_TYPES)})"
        )
    config_cls = CONFIG_TYPES[model_type]
    if isinstance(config, ModelConfig):
        if not isinstance(config, config_cls):
            raise ValueError(f"model_type {model_type!r} needs a {config_cls.__name__}, got a {type(config).__name__}")
        return MODEL_TYPES[model_type](config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a {config_cls.__name__}, got {type(config).__name__}")
    try:
        cfg = config_cls.from_dict(config)
    except TypeError as err:  # e.g. a required field missing: say which model it was for
        raise ValueError(f"config does not fit model_type {model_type!r}: {err}") from err
    return MODEL_TYPES[model_type](cfg)


__all__ = [
    "AttentionOptions",
    "CONFIG_TYPES",
    "CausalLM",
    "CausalLMConfig",
    "MODEL_TYPES",
    "ModelConfig",
    "ModelOutput",
    "Seq2SeqConfig",
    "Seq2SeqOutput",
    "Seq2SeqTransformer",
    "TextClassifier",
    "TextClassifierConfig",
    "TransformerOptions",
    "ViTConfig",
    "VisionTransformer",
    "build_model",
    "count_parameters",
    "sample_next",
    "sequence_loss",
]
