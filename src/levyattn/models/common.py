"""What every model file shares: config validation, (de)serialisation, attention options,
the Hugging Face-style output, and a few small tensor helpers.

Each model's config is a dataclass that inherits :class:`ModelConfig` (``to_dict`` /
``from_dict``, validation in ``__post_init__``) and usually :class:`AttentionOptions` (the
FNA kernel and projection options, flat so that ``--set model.alpha=1.4`` reaches them) through
:class:`TransformerOptions` (the block sizes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
from torch import nn

from levyattn.config import FNAConfig, check_bool, check_choice, check_float, check_int, did_you_mean
from levyattn.functional import BACKENDS
from levyattn.nn import ATTENTION_KINDS

C = TypeVar("C", bound="ModelConfig")


# --- configs -----------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Base of every model config: validated on construction, JSON round trip."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden; each subclass calls super().validate()
        pass

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values (tuples become lists); ``from_dict`` inverts it."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def coerce(cls: type[C], config: C | dict[str, Any]) -> C:
        """``config`` if it is a ``cls``; a ``cls`` built by :meth:`from_dict` if it is a dict."""
        if isinstance(config, dict):
            return cls.from_dict(config)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__} or a dict, got {type(config).__name__}")
        return config

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from ``to_dict()`` output (missing keys take defaults; unknown keys are an error)."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = "".join(did_you_mean(name, known) for name in unknown)
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}{hints} (valid fields are {sorted(known)})")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class AttentionOptions(ModelConfig):
    """The FNA kernel and projection options, shared by every model (see ``levyattn.nn``).

    alpha, bandwidth, manifold, rescale: the kernel, validated as a
        :class:`~levyattn.config.FNAConfig` whose defaults they share (its other fields keep
        their defaults; ``exclude_self`` follows ``qk_share``).
    orthogonal: W_Q, W_K orthogonal (distance preserving); one head drops W_Q.
    qk_share: one projection for queries and keys; self-pairs excluded.
    learnable_alpha / learnable_bandwidth: one value per head, trained.
    backend: "auto", "reference", "tiled", "sdpa" or "flex".
    attn_dropout: dropout on attention weights. Default 0: with FNA a positive value
        materialises the (L, L) weights while training (the ``reference`` backend), so
        the models put their dropout on embeddings and feed-forward blocks instead.
    attn_bias: bias in the q/k/v/out projections (the paper's runs have none).
    Softmax attention ignores the kernel options and keeps the projection options
    (``orthogonal``, ``qk_share``), dropout and bias: the same parameters as FNA.
    """

    alpha: float = FNAConfig.alpha
    bandwidth: float = FNAConfig.bandwidth
    manifold: str = FNAConfig.manifold
    rescale: bool = FNAConfig.rescale
    orthogonal: bool = False
    qk_share: bool = False
    learnable_alpha: bool = False
    learnable_bandwidth: bool = False
    backend: str = "auto"
    attn_dropout: float = 0.0
    attn_bias: bool = False

    def validate(self) -> None:
        super().validate()
        kernel = FNAConfig(alpha=self.alpha, bandwidth=self.bandwidth, manifold=self.manifold, rescale=self.rescale)
        self.alpha, self.bandwidth = kernel.alpha, kernel.bandwidth
        check_choice("backend", self.backend, BACKENDS)
        for name in ("orthogonal", "qk_share", "learnable_alpha", "learnable_bandwidth", "attn_bias"):
            check_bool(name, getattr(self, name))
        self.attn_dropout = check_float("attn_dropout", self.attn_dropout, 0.0, 1.0, hi_open=True)

    def attention_kwargs(self, *, for_layer: bool = False) -> dict[str, Any]:
        """Keyword arguments of ``levyattn.nn.make_attention``; with ``for_layer=True`` those of
        the nn encoder/decoder layers, which name the attention dropout ``attn_dropout``
        (their own ``dropout`` is the residual/feed-forward one)."""
        same_name = ("alpha", "bandwidth", "manifold", "rescale", "orthogonal", "qk_share", "learnable_alpha",
                     "learnable_bandwidth", "backend")  # fmt: skip
        kwargs = {name: getattr(self, name) for name in same_name}
        kwargs["bias"] = self.attn_bias
        kwargs["attn_dropout" if for_layer else "dropout"] = self.attn_dropout
        return kwargs


@dataclass(kw_only=True)
class TransformerOptions(AttentionOptions):
    """:class:`AttentionOptions` and the sizes of the Transformer blocks every model stacks
    (each model's config sets its own defaults).

    d_model: hidden size E; num_heads must divide it.
    dim_feedforward: feed-forward width (None = 4 * d_model).
    dropout: on embeddings, residual branches and the feed-forward block.
    activation: "relu" or "gelu"; layer_norm_eps: the LayerNorms' eps.
    """

    d_model: int = 64
    num_heads: int = 1
    dim_feedforward: int | None = None
    dropout: float = 0.1
    activation: str = "relu"
    layer_norm_eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        check_int("d_model", self.d_model, 1)
        check_int("num_heads", self.num_heads, 1)
        check_heads(self.d_model, self.num_heads)
        if self.dim_feedforward is not None:
            check_int("dim_feedforward", self.dim_feedforward, 1)
        self.dropout = check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_choice("activation", self.activation, ("relu", "gelu"))
        self.layer_norm_eps = check_float("layer_norm_eps", self.layer_norm_eps, 0.0, 1.0)

    @property
    def ffn_dim(self) -> int:
        return self.dim_feedforward if self.dim_feedforward is not None else 4 * self.d_model

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``FractionalTransformerEncoderLayer`` / ``...DecoderLayer`` shared
        by every model built from them (all but the attention kinds; those configs have ``norm_first``)."""
        return dict(
            d_model=self.d_model,
            nhead=self.num_heads,
            dim_feedforward=self.ffn_dim,
            dropout=self.dropout,
            activation=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            norm_first=self.norm_first,
            **self.attention_kwargs(for_layer=True),
        )


def check_attention_kind(name: str, value: Any) -> str:
    return check_choice(name, value, ATTENTION_KINDS)


def check_heads(d_model: int, num_heads: int) -> None:
    if d_model % num_heads:
        raise ValueError(f"num_heads must divide d_model={d_model}, got num_heads={num_heads}")


# --- outputs -----------------------------------------------------------------------------


@dataclass
class ModelOutput:
    """What every model's ``forward`` returns, whatever its flags (as Hugging Face's outputs).

    logits: the model's output scores: (B, num_classes) for classifiers, (B, L, V) for
        language and translation models.
    attentions: with ``output_attentions=True`` a tuple with one tensor per layer of the
        self-attention weights, (B, H, L, S) (a translation model's: its decoder's); else None.
    """

    logits: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class Seq2SeqOutput(ModelOutput):
    """:class:`ModelOutput` of an encoder-decoder model; with ``output_attentions=True`` also
    ``encoder_attentions`` (B, H, S, S) and ``cross_attentions`` (B, H, T, S) per layer."""

    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def run_encoder_layers(
    layers: nn.ModuleList, x: torch.Tensor, key_padding_mask: torch.Tensor | None, output_attentions: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """x (B, L, E) through ``FractionalTransformerEncoderLayer``s -> ((B, L, E), the layers'
    (B, H, L, L) weights with ``output_attentions``, else None)."""
    weights = []
    for layer in layers:
        if output_attentions:
            x, w = layer(x, src_key_padding_mask=key_padding_mask, need_weights=True)
            weights.append(w)
        else:
            x = layer(x, src_key_padding_mask=key_padding_mask)
    return x, tuple(weights) if output_attentions else None


def check_ids(name: str, ids: Any, vocab_size: int, max_len: int | None = None) -> torch.Tensor:
    """(B, L) integer token ids in [0, vocab_size), L <= max_len."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must be a (B, L) integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} must hold ids in [0, {vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]"
        )
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{name} length must be <= max_len={max_len}, got {ids.shape[1]}")
    return ids


def check_padding_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A (B, L) bool padding mask (True = padding) of the given shape, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = padding), got {getattr(mask, 'dtype', type(mask))}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """(max_len, d_model) fixed sin/cos positional encodings (Vaswani et al. 2017)."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return pe


def brownian_positions(max_len: int, d_model: int) -> torch.Tensor:
    """(max_len, d_model) fixed sin/cos encodings whose geometry is a Brownian path:
    ``||p_i - p_j||^2 ~ |i - j|`` (within about 15% for d_model >= 32, gaps 1 to max_len).

    Why: a distance kernel sees the positions only through this geometry. With the standard
    encodings (:func:`sinusoidal_positions`, equal amplitudes) ``||p_i - p_j||^2`` grows like
    ``log |i - j|``, so even the Gaussian (alpha = 2) kernel decays as a power of the gap. Here
    the Gaussian decays exponentially with the gap (local, Brownian) and the power law of
    alpha < 2 as a power of it (multiscale, Levy); the norms stay near-constant, so a dot
    product ``p_i . p_j = const - ||p_i - p_j||^2 / 2`` decays exponentially too.

    How: d_model / 2 sin/cos pairs at frequencies log-spaced from pi down to pi / (4 max_len),
    the pair at frequency w with amplitude sqrt(h / (pi w)) (h the log spacing): the sum
    ``sum 2 a^2 (1 - cos(w g))`` is then a Riemann sum of ``integral (1 - cos(w g)) / w^2 dw
    = pi g / 2`` scaled to ``g``.
    """
    if d_model < 4 or d_model % 2:
        raise ValueError(f"d_model must be even and >= 4 for brownian positions, got {d_model}")
    n_freq = d_model // 2
    log_hi, log_lo = math.log(math.pi), math.log(math.pi / (4 * max_len))
    step = (log_hi - log_lo) / (n_freq - 1)
    freq = torch.exp(torch.linspace(log_hi, log_lo, n_freq, dtype=torch.float64))
    amplitude = (step / (math.pi * freq)).sqrt()
    angle = torch.arange(max_len, dtype=torch.float64).unsqueeze(1) * freq
    pe = torch.empty(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = amplitude * torch.sin(angle)
    pe[:, 1::2] = amplitude * torch.cos(angle)
    return pe.float()


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; an orthogonal parametrisation counts its base weight."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
