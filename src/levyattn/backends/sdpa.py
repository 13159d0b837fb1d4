"""alpha = 2 (Euclidean) exactly through ``scaled_dot_product_attention`` (docs/operator.md, "Backends").

``-||q - k||^2 / (kappa^2 eps) = (2 q.k - ||k||^2) / (kappa^2 eps) - ||q||^2 / (kappa^2 eps)``
and the last term is constant along a row, so with ``q~ = [q, 1]``,
``k~ = [k, -||k||^2 / 2]`` and scale ``2 / (kappa^2 eps)`` the Gaussian FNA is softmax
attention with one extra dimension: PyTorch's fused kernels, their speed and memory.

Without masks and without gradients (inference), the ``-||k||^2 / 2`` term goes in as an
additive (B, H, 1, Nk) key bias instead, broadcast over the queries: the head dim stays d,
which PyTorch's fused CPU kernel runs faster than d + 1 (forward at (1, 4, 4096, 64): 1.05-1.08x
softmax's time against 1.12-1.14x). Training keeps the extra dimension: SDPA gives no gradient
for its mask, and the bias depends on k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from levyattn.backends.common import AttentionCall, additive_sum


def unsupported(call: AttentionCall, q: torch.Tensor) -> str | None:
    if not call.is_gaussian:
        return "the sdpa backend computes alpha = 2 only (float alpha == 2)"
    if call.manifold != "euclidean":
        return "the sdpa backend needs manifold='euclidean' (sphere distances are not a dot product)"
    if call.density_a:
        return "the sdpa backend has no density normalisation (density_a must be 0)"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, needs_grad: bool) -> torch.Tensor:
    """``needs_grad``: whether autograd will differentiate this call (any of q, k, v or a
    bandwidth tensor requires grad, with grad mode on)."""
    q, k = call.prepare(q, k)
    (nq, d), (nk, dv) = q.shape[-2:], v.shape[-2:]
    kap = call.kernel_kwargs(d)["kappa"]
    scale = 2.0 / (kap * kap * call.bandwidth)  # a tensor for per-head bandwidth
    half_k_sq = 0.5 * (k * k).sum(-1, keepdim=True)
    plain_causal = call.is_causal and nq == nk and call.attn_mask is None and not call.exclude_self
    mask = None if plain_causal else additive_sum(call.mask_parts(0, nq, nq, nk, q.device), q.dtype)
    # PyTorch's fused CPU kernel wants one head dim for q, k and v: pad to the widest rather
    # than fall back to the slow path.
    if mask is None and not plain_causal and not needs_grad:
        width = max(d, dv)
        key_bias = -half_k_sq.transpose(-1, -2) * scale  # (B, H, 1, Nk)
        q_pad, k_pad, v_pad = (F.pad(x, (0, width - x.shape[-1])) for x in (q * scale, k, v))
        return F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=key_bias, scale=1.0)[..., :dv]
    # With a mask, v gets a column of ones at index dv: its output is the row sum of the
    # weights, 1, or 0 / NaN for a row with no allowed key, which finds those rows without a
    # pass over the (B, H, Nq, Nk) mask.
    width = max(d + 1, dv + (mask is not None))
    q_aug = F.pad(torch.cat([q, torch.ones_like(q[..., :1])], dim=-1) * scale, (0, width - d - 1))
    k_aug = F.pad(torch.cat([k, -half_k_sq], dim=-1), (0, width - d - 1))
    v_pad = F.pad(v, (0, width - dv))
    if mask is not None:
        v_pad[..., dv] = 1.0
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_pad, attn_mask=mask, is_causal=plain_causal, scale=1.0)
    if mask is None:
        return out[..., :dv]
    # A row with no allowed key is 0 by convention; SDPA may give NaN there.
    empty = ~(out[..., dv : dv + 1] > 0.5)
    return out[..., :dv].masked_fill(empty, 0.0)
