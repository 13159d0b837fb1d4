"""Modules: ``FractionalMultiheadAttention``, its softmax twin, and Transformer layers.

``FractionalMultiheadAttention`` takes ``torch.nn.MultiheadAttention``'s call, with other
defaults (``batch_first=True``, ``bias=False``, ``need_weights=False``: pass
``batch_first=False, bias=True, need_weights=True`` to get nn.MultiheadAttention's):

- inputs are (B, L, E) with ``batch_first=True`` (the default here) or (L, B, E);
- ``key_padding_mask`` (B, S): bool True = padding (ignored), or float added;
- ``attn_mask`` (L, S) or (B * H, L, S): bool **True = not allowed** (the
  ``nn.MultiheadAttention`` convention, the opposite of ``scaled_dot_product_attention``),
  or float added to the log-kernel;
- returns ``(output, weights)``; weights are (B, L, S) averaged over heads, or
  (B, H, L, S) with ``average_attn_weights=False``, and None unless ``need_weights``;
  while training with dropout, the weights after dropout, which the output used.

Attention dropout acts on the weights, so while training with ``dropout > 0`` the
weights are materialised (the ``reference`` backend); set ``dropout=0`` to keep the
memory-efficient backends during training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from levyattn.backends.common import AttentionCall, additive_sum, structural_keep
from levyattn.config import FNAConfig, check_bool
from levyattn.functional import BACKENDS, attend, check_mask

ATTENTION_KINDS = ("fna", "softmax")
# Ranges a learnable alpha and bandwidth are kept in.
_ALPHA_LO, _ALPHA_HI = 1e-3, 2.0 - 1e-3
_LOG_BANDWIDTH_LIMIT = 30.0


class KVCache:
    """Projected keys and values of past positions, (B, H, S, d), for incremental decoding.

    With a cache, a module's new keys/values are appended and its queries attend to all
    of them; causal masking is bottom-right aligned, so the last query sees every key.
    A ``static`` cache is filled once and then reused as it is: the projected encoder
    output of cross-attention, which does not change while decoding. A decoder layer keeps
    its cross-attention cache in ``memory`` of its self-attention cache.
    """

    def __init__(self, static: bool = False) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.static = static
        self.memory: KVCache | None = None

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=-2)
            self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch entries (beam search): index (B',) into the batch dimension."""
        if self.key is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)
        if self.memory is not None:
            self.memory.reorder(index)


def _check_key_value(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """query (B, L, E), key (B, S, kdim), value (B, S, vdim), batch first, as nn.MultiheadAttention
    requires them: the backends would broadcast a key batch of 1 over the queries', or read the
    first S of more values, instead of failing."""
    for name, x in (("key", key), ("value", value)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D like query, got shape {tuple(x.shape)}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(
            f"key and value need the same batch size and length, got (batch, length) {tuple(key.shape[:2])} "
            f"and {tuple(value.shape[:2])}"
        )
    if key.shape[0] != query.shape[0]:
        raise ValueError(f"key and value need query's batch size {query.shape[0]}, got {key.shape[0]}")


def _combine_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    nq: int,
    nk: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """nn.MultiheadAttention masks -> one mask in the convention of ``fractional_attention``
    and SDPA: bool (True = keep) when both are bool, else additive of ``dtype``."""
    for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        # As nn.MultiheadAttention: an integer mask (1 = padding) added to the logits would leave
        # the keys it means to remove most of their weight.
        if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{name} must be bool or floating, got {mask.dtype}")
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (nq, nk):
                raise ValueError(f"attn_mask must be (L, S) = {(nq, nk)}, got {tuple(attn_mask.shape)}")
            attn_mask = attn_mask.view(1, 1, nq, nk)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (batch * heads, nq, nk):
                raise ValueError(
                    f"attn_mask must be (B*H, L, S) = {(batch * heads, nq, nk)}, got {tuple(attn_mask.shape)}"
                )
            attn_mask = attn_mask.view(batch, heads, nq, nk)
        else:
            raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
        masks.append(attn_mask)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, nk):
            raise ValueError(f"key_padding_mask must be (B, S) = {(batch, nk)}, got {tuple(key_padding_mask.shape)}")
        masks.append(key_padding_mask.view(batch, 1, 1, nk))
    # nn.MultiheadAttention's bool masks mark what is *not* allowed; ours mark what is kept.
    masks = [~m if m.dtype == torch.bool else m for m in masks]
    if masks and all(m.dtype == torch.bool for m in masks):
        return masks[0] if len(masks) == 1 else masks[0] & masks[1]  # bool stays bool for the backends
    return additive_sum(tuple(masks), dtype)


class _MultiheadBase(nn.Module):
    """Projections, mask handling and the nn.MultiheadAttention call shared by both kinds.

    ``orthogonal`` constrains W_Q and W_K to orthogonal matrices (docs/modules.md). With one head
    W_Q is then omitted, as in the reference models: a rotation shared by queries and keys
    changes neither their distances nor their dot products, so W_K alone carries W_Q^T W_K.
    ``qk_share`` uses one projection for queries and keys.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        orthogonal: bool = False,
        qk_share: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing embed_dim={embed_dim}, got {num_heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.qk_share = bool(qk_share)
        if qk_share and self.kdim != embed_dim:
            raise ValueError(f"qk_share needs kdim == embed_dim, got kdim={self.kdim}, embed_dim={embed_dim}")
        if orthogonal and self.kdim != embed_dim:
            raise ValueError(f"orthogonal needs kdim == embed_dim, got kdim={self.kdim}")
        self.orthogonal = bool(orthogonal)
        query_projection = not (orthogonal and num_heads == 1)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if query_projection else None
        self.k_proj = None if qk_share else nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if orthogonal:
            for proj in (self.q_proj, self.k_proj):
                if proj is not None:
                    nn.utils.parametrizations.orthogonal(proj, "weight")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _project_query(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.q_proj is None else self.q_proj(x)

    def _project_key(self, x: torch.Tensor) -> torch.Tensor:
        return self._project_query(x) if self.qk_share else self.k_proj(x)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (B, L, E), key (B, S, kdim), value (B, S, vdim) -> ((B, L, E), weights or None).

        With ``kv_cache``, ``key``/``value`` are the new positions only; masks then cover
        all cached plus new keys. A filled static cache is used instead of ``key``/``value``.
        """
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if query.dim() != 3:
            raise ValueError(f"query must be (B, L, E), got shape {tuple(query.shape)}")
        check_bool("is_causal", is_causal)  # as SDPA: a string "False" would be causal
        q = self._heads(self._project_query(query))
        if kv_cache is not None and kv_cache.static and len(kv_cache):
            k, v = kv_cache.key, kv_cache.value
        else:
            _check_key_value(query, key, value)
            k = self._heads(self._project_key(key))
            v = self._heads(self.v_proj(value))
            if kv_cache is not None:
                k, v = kv_cache.update(k, v)
        batch, nq, nk = q.shape[0], q.shape[2], k.shape[2]
        if k.shape[0] != batch:  # a cache filled for another batch
            raise ValueError(f"kv_cache holds keys of batch size {k.shape[0]}, but query has batch size {batch}")
        mask = _combine_masks(attn_mask, key_padding_mask, batch, self.num_heads, nq, nk, q.dtype)
        out, weights = self._attend(q, k, v, mask, is_causal, need_weights)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, nq, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


class FractionalMultiheadAttention(_MultiheadBase):
    """Multi-head fractional attention with the call of ``torch.nn.MultiheadAttention``.

    Not a drop-in: the defaults differ from ``nn.MultiheadAttention``'s (``batch_first=True``,
    ``bias=False``, and ``forward(need_weights=False)``); pass them to port code written for it.

    Args (beyond nn.MultiheadAttention's):
        alpha, bandwidth, manifold, rescale: the kernel, validated and kept as the
            :class:`~levyattn.config.FNAConfig` ``self.kernel`` (defaults are FNAConfig's; its
            other fields keep their defaults, and ``exclude_self`` follows ``qk_share``); with
            ``learnable_alpha`` / ``learnable_bandwidth`` its values are the initial ones.
        orthogonal: W_Q and W_K constrained orthogonal (distance-preserving); with one head
            the query projection is omitted, as in the reference models.
        qk_share: one projection for queries and keys; each token's self-pair is excluded.
        learnable_alpha: one alpha per head, kept in [0.001, 1.999] by a scaled sigmoid.
        learnable_bandwidth: one bandwidth per head, ``exp`` of a log clamped to [-30, 30].
        backend: passed to ``fractional_attention`` ("auto", "reference", "tiled", ...).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        alpha: float = FNAConfig.alpha,
        bandwidth: float = FNAConfig.bandwidth,
        manifold: str = FNAConfig.manifold,
        rescale: bool = FNAConfig.rescale,
        orthogonal: bool = False,
        qk_share: bool = False,
        learnable_alpha: bool = False,
        learnable_bandwidth: bool = False,
        dropout: float = 0.0,
        bias: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            orthogonal=orthogonal,
            qk_share=qk_share,
        )
        self.kernel = FNAConfig(
            alpha=alpha, bandwidth=bandwidth, manifold=manifold, rescale=rescale, exclude_self=self.qk_share
        )
        alpha, bandwidth = self.kernel.alpha, self.kernel.bandwidth
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if learnable_alpha:
            # alpha = lo + (hi - lo) * sigmoid(logit): strictly inside (0, 2) even when the
            # sigmoid saturates to exactly 0 or 1 in float32.
            a = (min(max(alpha, _ALPHA_LO + 1e-3), _ALPHA_HI - 1e-3) - _ALPHA_LO) / (_ALPHA_HI - _ALPHA_LO)
            self.alpha_logit = nn.Parameter(torch.full((num_heads,), math.log(a / (1 - a))))
        else:
            self.alpha_logit = None
        if learnable_bandwidth:
            self.log_bandwidth = nn.Parameter(torch.full((num_heads,), math.log(bandwidth)))
        else:
            self.log_bandwidth = None

    @property
    def alpha(self) -> float | torch.Tensor:
        """The Lévy index: a float, or (H,) values in (0, 2) when learnable."""
        if self.alpha_logit is None:
            return self.kernel.alpha
        return _ALPHA_LO + (_ALPHA_HI - _ALPHA_LO) * torch.sigmoid(self.alpha_logit)

    @property
    def bandwidth(self) -> float | torch.Tensor:
        """The bandwidth eps: a float, or (H,) positive values when learnable."""
        if self.log_bandwidth is None:
            return self.kernel.bandwidth
        return self.log_bandwidth.clamp(-_LOG_BANDWIDTH_LIMIT, _LOG_BANDWIDTH_LIMIT).exp()

    def _call(self, q, k, mask, is_causal) -> AttentionCall:
        """This module's kernel for one call, without checking again what was checked when the
        module was built: learnable alpha and bandwidth as (H, 1, 1), the mask checked."""
        alpha, bandwidth = self.alpha, self.bandwidth
        kernel = self.kernel
        return AttentionCall(
            alpha=alpha.view(-1, 1, 1) if isinstance(alpha, torch.Tensor) else alpha,
            bandwidth=bandwidth.view(-1, 1, 1) if isinstance(bandwidth, torch.Tensor) else bandwidth,
            manifold=kernel.manifold,
            rescale=kernel.rescale,
            d_intrinsic=kernel.d_intrinsic,
            sphere_radius=kernel.sphere_radius,
            density_a=kernel.density_a,
            attn_mask=None if mask is None else check_mask(mask, q, k),
            is_causal=bool(is_causal),
            exclude_self=kernel.exclude_self,
        )

    def _attend(self, q, k, v, mask, is_causal, need_weights):
        call = self._call(q, k, mask, is_causal)
        materialise = need_weights or (self.training and self.dropout > 0)
        if not materialise:
            return attend(q, k, v, call, backend=self.backend), None
        out, weights = attend(q, k, v, call, return_weights=True)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)  # returned as used, as nn.MultiheadAttention does
            out = weights @ v
        return out, (weights if need_weights else None)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, manifold={self.kernel.manifold!r}, "
            f"orthogonal={self.orthogonal}, qk_share={self.qk_share}, backend={self.backend!r}"
        )


class SoftmaxMultiheadAttention(_MultiheadBase):
    """Softmax attention with the same projections and call, through
    ``scaled_dot_product_attention``: the controlled baseline for FNA. ``orthogonal`` and
    ``qk_share`` constrain the projections as they do for FNA (the same parameters), and
    ``qk_share`` excludes the self-pairs as FNA does."""

    def __init__(self, embed_dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(embed_dim, num_heads, **kwargs)

    def _attend(self, q, k, v, mask, is_causal, need_weights):
        nq, nk = q.shape[-2], k.shape[-2]
        dropout = self.dropout if self.training else 0.0
        if is_causal and nq == nk and mask is None and not self.qk_share and not need_weights:
            # SDPA's own causal path needs no mask (its alignment is ours when Nq == Nk).
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout), None
        if is_causal or self.qk_share:
            keep = structural_keep(0, nq, nq, nk, is_causal, self.qk_share, q.device)
            mask = additive_sum((mask, keep), q.dtype)
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        weights = F.dropout(torch.softmax(logits, dim=-1).nan_to_num(0.0), dropout)  # returned as used, as torch's
        return weights @ v, weights


def make_attention(kind: str, embed_dim: int, num_heads: int, **kwargs) -> _MultiheadBase:
    """ "fna" -> FractionalMultiheadAttention, "softmax" -> SoftmaxMultiheadAttention.

    FNA-only keyword arguments are dropped for softmax, so one configuration serves both
    sides of a controlled comparison.
    """
    if kind == "fna":
        return FractionalMultiheadAttention(embed_dim, num_heads, **kwargs)
    if kind == "softmax":
        shared = {"dropout", "bias", "kdim", "vdim", "batch_first", "orthogonal", "qk_share"}
        return SoftmaxMultiheadAttention(embed_dim, num_heads, **{k: v for k, v in kwargs.items() if k in shared})
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")


class FeedForward(nn.Module):
    """Position-wise ``linear2(dropout(activation(linear1(x))))``, then dropout."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: str) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.relu if activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class _ResidualLayer(nn.Module):
    """What the encoder and decoder layers share: the arguments of ``nn.TransformerEncoderLayer``
    that they take, their attention modules, a feed-forward block, one LayerNorm per sub-block
    (``norm1``, ``norm2``, ...), the residual dropout, and the residual wiring, post-LN
    (``norm_first=False``) or pre-LN.

    Each layer's ``_attentions`` builds its attention modules from ``attention_kwargs`` (its
    attention kinds and ``make_attention``'s options). They are registered first, so parameters
    keep the order saved optimiser states were written in.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        layer_norm_eps: float = 1e-6,
        norm_first: bool = False,
        attn_dropout: float = 0.0,
        **attention_kwargs,
    ) -> None:
        super().__init__()
        attentions = self._attentions(d_model, nhead, dict(attention_kwargs, batch_first=True, dropout=attn_dropout))
        for name, module in attentions.items():
            self.add_module(name, module)
        self.feed_forward = FeedForward(d_model, dim_feedforward, dropout, activation)
        for i in range(1, len(attentions) + 2):
            self.add_module(f"norm{i}", nn.LayerNorm(d_model, eps=layer_norm_eps))
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _attentions(self, d_model: int, nhead: int, attention_kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x + sublayer(norm(x))`` (pre-LN) or ``norm(x + sublayer(x))`` (post-LN); ``sublayer``
        returns (output, attention weights or None)."""
        if self.norm_first:
            out, weights = sublayer(norm(x))
            return x + out, weights
        out, weights = sublayer(x)
        return norm(x + out), weights

    def _feed_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.feed_forward(x), None


class FractionalTransformerEncoderLayer(_ResidualLayer):
    """Self-attention + feed-forward, usable like ``nn.TransformerEncoderLayer`` (batch_first).

    Arguments: ``d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
    layer_norm_eps=1e-6, norm_first=False, attn_dropout=0.0``, then by keyword ``attention``
    ("fna", the default, or "softmax") and ``make_attention``'s options (alpha, bandwidth, ...).
    Post-LN (``norm_first=False``, the reference's, LayerNorm eps 1e-6) or pre-LN.
    ``attn_dropout`` is the attention modules' dropout (``dropout`` is the residual/feed-forward one).
    """

    def _attentions(self, d_model: int, nhead: int, attention_kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        attention = attention_kwargs.pop("attention", "fna")
        return {"self_attn": make_attention(attention, d_model, nhead, **attention_kwargs)}

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """src (B, L, E) -> (B, L, E); with ``need_weights`` also the (B, H, L, L) weights."""

        def self_block(h):
            out, weights = self.self_attn(
                h, h, h, key_padding_mask=src_key_padding_mask, attn_mask=src_mask, need_weights=need_weights,
                average_attn_weights=False, is_causal=is_causal,
            )  # fmt: skip
            return self.dropout(out), weights

        x, weights = self._residual(src, self.norm1, self_block)
        x, _ = self._residual(x, self.norm2, self._feed_forward)
        return (x, weights) if need_weights else x


class FractionalTransformerDecoderLayer(_ResidualLayer):
    """Causal self-attention, cross-attention and feed-forward, like
    ``nn.TransformerDecoderLayer`` (batch_first), with a key/value cache for decoding.

    Arguments as the encoder layer's, with ``self_attention`` and ``cross_attention`` (each "fna",
    the default, or "softmax") in place of ``attention``; the cross-attention ignores ``qk_share``.
    """

    def _attentions(self, d_model: int, nhead: int, attention_kwargs: dict[str, Any]) -> dict[str, nn.Module]:
        self_attention = attention_kwargs.pop("self_attention", "fna")
        cross_attention = attention_kwargs.pop("cross_attention", "fna")
        cross_kwargs = {k: v for k, v in attention_kwargs.items() if k != "qk_share"}
        return {
            "self_attn": make_attention(self_attention, d_model, nhead, **attention_kwargs),
            "cross_attn": make_attention(cross_attention, d_model, nhead, **cross_kwargs),
        }

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool = True,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tgt (B, T, E), memory (B, S, E) -> (B, T, E); with ``need_weights`` also the
        self- and cross-attention weights, (B, H, T, T) and (B, H, T, S).

        With ``cache``, ``tgt`` holds only the new positions; the cache keeps the
        self-attention keys/values of earlier ones (``tgt_key_padding_mask`` then covers
        all positions so far) and, in ``cache.memory``, the projected ``memory``, which is
        then projected once per sequence rather than once per step.
        """
        x = tgt
        memory_cache = None
        if cache is not None:
            if cache.memory is None:
                cache.memory = KVCache(static=True)
            memory_cache = cache.memory

        def self_block(h):
            out, weights = self.self_attn(
                h, h, h, key_padding_mask=tgt_key_padding_mask, attn_mask=tgt_mask, is_causal=tgt_is_causal,
                kv_cache=cache, need_weights=need_weights, average_attn_weights=False,
            )  # fmt: skip
            return self.dropout(out), weights

        def cross_block(h):
            out, weights = self.cross_attn(
                h, memory, memory, key_padding_mask=memory_key_padding_mask, attn_mask=memory_mask,
                need_weights=need_weights, average_attn_weights=False, kv_cache=memory_cache,
            )  # fmt: skip
            return self.dropout(out), weights

        x, self_weights = self._residual(x, self.norm1, self_block)
        x, cross_weights = self._residual(x, self.norm2, cross_block)
        x, _ = self._residual(x, self.norm3, self._feed_forward)
        return (x, self_weights, cross_weights) if need_weights else x
