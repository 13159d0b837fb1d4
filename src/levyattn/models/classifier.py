"""Text classifier: token + positional embeddings, L encoder layers, pooling, a linear head.

    input_ids (B, L) --embed--> (B, L, E) --[encoder layer] x L--> pool --> head --> (B, num_classes)

- Encoder layers are ``levyattn.nn.FractionalTransformerEncoderLayer``: post-LN as the
  reference models (``norm_first=False``), pre-LN as an option (then a final LayerNorm).
- ``attention`` is "fna" (fractional attention) or "softmax" (``scaled_dot_product_attention``),
  with every FNA option of :class:`~levyattn.models.common.AttentionOptions`.
- Pooling: "mean" over valid (non-padding) tokens, or "cls" (a learned class token
  prepended to the sequence; its final state is classified).
- Padding: ``key_padding_mask`` (B, L) bool, True = padding; or derived from ``pad_id``
  when the config sets one. Padded positions are never attended to and never pooled,
  so the logits do not depend on what the padding holds or how much of it there is.

The paper's configurations: :meth:`TextClassifierConfig.single_layer` (1 layer, 1 head,
hidden 8-64, orthogonal, qk_share) and :meth:`TextClassifierConfig.deep` (6 layers,
8 heads, hidden 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from levyattn.config import check_bool, check_choice, check_int
from levyattn.models import common
from levyattn.models.common import ModelOutput, TransformerOptions
from levyattn.nn import FractionalTransformerEncoderLayer


@dataclass(kw_only=True)
class TextClassifierConfig(TransformerOptions):
    """Hyperparameters of :class:`TextClassifier` (the FNA options and block sizes are inherited).

    vocab_size, num_classes: sizes of the input vocabulary and of the label set (>= 2).
    max_len: the longest input (positional table size).
    positional: "learned" (a table), "sinusoidal" (fixed, Vaswani et al.) or "brownian"
        (fixed, squared distance between positions ~ their gap: see
        :func:`levyattn.models.common.brownian_positions`).
    pooling: "mean" (over valid tokens) or "cls" (class token).
    pad_id: when set, tokens equal to it are treated as padding if no mask is given.
    """

    vocab_size: int
    num_classes: int = 2
    max_len: int = 512
    num_layers: int = 1
    norm_first: bool = False
    positional: str = "learned"
    pooling: str = "mean"
    pad_id: int | None = None
    attention: str = "fna"

    def validate(self) -> None:
        super().validate()
        check_int("vocab_size", self.vocab_size, 1)
        check_int("num_classes", self.num_classes, 2)
        check_int("max_len", self.max_len, 1)
        check_int("num_layers", self.num_layers, 1)
        check_bool("norm_first", self.norm_first)
        check_choice("positional", self.positional, ("learned", "sinusoidal", "brownian"))
        check_choice("pooling", self.pooling, ("mean", "cls"))
        if self.pad_id is not None:
            check_int("pad_id", self.pad_id, 0, self.vocab_size - 1)
        common.check_attention_kind("attention", self.attention)
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"d_model must be even for sinusoidal positions, got {self.d_model}")
        if self.positional == "brownian" and (self.d_model % 2 or self.d_model < 4):
            raise ValueError(f"d_model must be even and >= 4 for brownian positions, got {self.d_model}")

    @classmethod
    def single_layer(cls, vocab_size: int, hidden: int = 32, **overrides: Any) -> TextClassifierConfig:
        """The paper's IMDb single-layer model: 1 layer, 1 head, orthogonal, qk_share, eps 1."""
        base = dict(
            vocab_size=vocab_size, d_model=hidden, num_layers=1, num_heads=1, orthogonal=True, qk_share=True,
            alpha=1.2, bandwidth=1.0, manifold="euclidean", rescale=True, max_len=512,
        )  # fmt: skip
        return cls(**{**base, **overrides})

    @classmethod
    def deep(cls, vocab_size: int, **overrides: Any) -> TextClassifierConfig:
        """The paper's deep IMDb model: 6 layers, 8 heads, hidden 256."""
        base = dict(vocab_size=vocab_size, d_model=256, num_layers=6, num_heads=8, max_len=512)
        return cls(**{**base, **overrides})


class TextClassifier(nn.Module):
    """Sequence classification with FNA or softmax encoder layers (see the module docstring)."""

    model_type = "text_classifier"

    def __init__(self, config: TextClassifierConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = c = TextClassifierConfig.coerce(config)
        n_pos = c.max_len + (1 if c.pooling == "cls" else 0)
        self.token_embedding = nn.Embedding(c.vocab_size, c.d_model)
        if c.positional == "learned":
            self.position_embedding = nn.Parameter(torch.zeros(n_pos, c.d_model))
            nn.init.normal_(self.position_embedding, std=0.02)
        else:
            fixed = common.sinusoidal_positions if c.positional == "sinusoidal" else common.brownian_positions
            self.register_buffer("position_embedding", fixed(n_pos, c.d_model), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.pooling == "cls" else None
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            FractionalTransformerEncoderLayer(**c.layer_kwargs(), attention=c.attention) for _ in range(c.num_layers)
        )
        # Post-LN layers end in a LayerNorm already; pre-LN stacks need one at the end.
        self.final_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.head = nn.Linear(c.d_model, c.num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """input_ids (B, L) long -> :class:`ModelOutput` with logits (B, num_classes).

        key_padding_mask: (B, L) bool, True = padding (default: ``input_ids == pad_id``
            when the config has a ``pad_id``, else no padding).
        output_attentions: also the per-layer attention weights, (B, H, L', L') with L' = L
            (+1 with ``pooling="cls"``: the class token is position 0).
        """
        c = self.config
        common.check_ids("input_ids", input_ids, c.vocab_size, c.max_len)
        if key_padding_mask is None and c.pad_id is not None:
            key_padding_mask = input_ids == c.pad_id
        common.check_padding_mask("key_padding_mask", key_padding_mask, tuple(input_ids.shape))

        x = self.token_embedding(input_ids)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            if key_padding_mask is not None:
                key_padding_mask = nn.functional.pad(key_padding_mask, (1, 0), value=False)
        x = self.dropout(x + self.position_embedding[: x.shape[1]])
        x, weights = common.run_encoder_layers(self.layers, x, key_padding_mask, output_attentions)
        x = self.final_norm(x)
        return ModelOutput(logits=self.head(self.pool(x, key_padding_mask)), attentions=weights)

    def pool(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L', E) -> (B, E): the class token's state, or the mean over valid tokens."""
        if self.cls_token is not None:
            return x[:, 0]
        if key_padding_mask is None:
            return x.mean(dim=1)
        valid = (~key_padding_mask).unsqueeze(-1).to(x.dtype)
        # An all-padding row pools to zeros rather than NaN.
        return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)
