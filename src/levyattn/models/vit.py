"""Vision Transformer with FNA or softmax attention.

    images (B, C, H, W) --patches (conv, stride = patch)--> (B, N, E) --[class token; + positions]-->
    (B, N + 1, E) --[encoder layer] x L--> LayerNorm --> class token (or mean) --> head --> (B, num_classes)

Pre-LN encoder layers by default (as ViT); ``norm_first=False`` gives the post-LN
reference layer. ``attention`` is "fna" or "softmax"; every FNA option is a config field.

Configurations: :meth:`ViTConfig.cifar10` (32x32x3, patch 4: 64 patches),
:meth:`ViTConfig.grey8` (8x8x1, e.g. scikit-learn digits, patch 2: 16 patches),
:meth:`ViTConfig.grey28` (28x28x1, MNIST-like, patch 4: 49 patches).
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
class ViTConfig(TransformerOptions):
    """Hyperparameters of :class:`VisionTransformer` (the FNA options and block sizes are inherited).

    image_size: side of the (square) input; patch_size must divide it.
    in_channels: 3 for colour, 1 for grey images.
    num_layers; norm_first: pre-LN (the default, as ViT) or post-LN.
    pooling: "cls" (class token) or "mean" (over patches).
    """

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    d_model: int = 128
    num_layers: int = 6
    num_heads: int = 4
    activation: str = "gelu"
    norm_first: bool = True
    pooling: str = "cls"
    attention: str = "fna"

    def validate(self) -> None:
        super().validate()
        check_int("image_size", self.image_size, 1)
        check_int("patch_size", self.patch_size, 1, self.image_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size must divide image_size={self.image_size}, got {self.patch_size}")
        check_int("in_channels", self.in_channels, 1)
        check_int("num_classes", self.num_classes, 2)
        check_int("num_layers", self.num_layers, 1)
        check_bool("norm_first", self.norm_first)
        check_choice("pooling", self.pooling, ("cls", "mean"))
        common.check_attention_kind("attention", self.attention)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def cifar10(cls, **overrides: Any) -> ViTConfig:
        """CIFAR-10: 32x32 RGB, patch 4 (64 patches), 6 layers, 4 heads, hidden 128."""
        base = dict(image_size=32, patch_size=4, in_channels=3, num_classes=10, d_model=128, num_layers=6, num_heads=4)
        return cls(**{**base, **overrides})

    @classmethod
    def grey8(cls, **overrides: Any) -> ViTConfig:
        """8x8 grey images (scikit-learn digits): patch 2 (16 patches), 2 layers, hidden 32."""
        base = dict(image_size=8, patch_size=2, in_channels=1, num_classes=10, d_model=32, num_layers=2, num_heads=2)
        return cls(**{**base, **overrides})

    @classmethod
    def grey28(cls, **overrides: Any) -> ViTConfig:
        """28x28 grey images (MNIST-like): patch 4 (49 patches), 4 layers, hidden 64."""
        base = dict(image_size=28, patch_size=4, in_channels=1, num_classes=10, d_model=64, num_layers=4, num_heads=4)
        return cls(**{**base, **overrides})


class VisionTransformer(nn.Module):
    """ViT image classifier (see the module docstring)."""

    model_type = "vit"

    def __init__(self, config: ViTConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = c = ViTConfig.coerce(config)
        # A strided convolution is the linear map of each flattened patch, applied to all.
        self.patch_embedding = nn.Conv2d(c.in_channels, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.pooling == "cls" else None
        n_pos = c.num_patches + (1 if c.pooling == "cls" else 0)
        self.position_embedding = nn.Parameter(torch.zeros(1, n_pos, c.d_model))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            FractionalTransformerEncoderLayer(**c.layer_kwargs(), attention=c.attention) for _ in range(c.num_layers)
        )
        self.final_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.head = nn.Linear(c.d_model, c.num_classes)

    def forward(self, images: torch.Tensor, output_attentions: bool = False) -> ModelOutput:
        """images (B, C, H, W) float -> :class:`ModelOutput` with logits (B, num_classes).

        output_attentions: also the per-layer (B, H, N', N') weights, N' = patches (+1 with
            ``pooling="cls"``: the class token is position 0; patches row-major).
        """
        c = self.config
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {getattr(images, 'dtype', type(images))}")
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")

        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, N, E), patches row-major
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.dropout(x + self.position_embedding)
        x, weights = common.run_encoder_layers(self.layers, x, None, output_attentions)
        x = self.final_norm(x)
        logits = self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))
        return ModelOutput(logits=logits, attentions=weights)
