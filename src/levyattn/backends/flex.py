"""FNA for any alpha through FlexAttention's ``score_mod`` (docs/operator.md, "Backends").

With ``q^ = [-2q, ||q||^2, 1]`` and ``k^ = [k, 1, ||k||^2]``, ``q^ . k^ = ||q - k||^2``; the
score modifier turns that squared distance into ``log Phi_alpha`` inside the fused
kernel, so the (Nq, Nk) matrix is never materialised. On the sphere the score is
``q^.k^`` of unit vectors and the modifier uses the squared chord ``2 - 2 q^.k^``.
In bfloat16/float16 the squared norms are split into a high and a low part so that the
norms keep float32 accuracy through the tensor-core dot product.

Training needs a GPU: PyTorch's FlexAttention has no backward on the CPU, where this
backend serves inference and the ``tiled`` backend serves training.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from levyattn.backends.common import LOW_PRECISION, AttentionCall
from levyattn.kernels import alpha_in, log_phi_from_sq


def available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(call: AttentionCall, q: torch.Tensor, needs_grad: bool) -> str | None:
    if not available():
        return "FlexAttention is not available in this PyTorch build"
    if call.density_a:
        return "the flex backend has no density normalisation (density_a must be 0)"
    if needs_grad and q.device.type == "cpu":
        return "FlexAttention has no backward pass on the CPU; use backend='tiled' to train on the CPU"
    for name in ("alpha", "bandwidth"):
        value = getattr(call, name)
        if isinstance(value, torch.Tensor) and value.requires_grad and needs_grad:
            return f"the flex backend cannot differentiate a learnable {name}; use backend='tiled'"
    if call.attn_mask is not None and call.attn_mask.requires_grad and needs_grad:
        return "the flex backend cannot differentiate a float attn_mask (a learnable bias); use backend='tiled'"
    return None


# Compiled variants of the kernel kept at once: one per static option tuple (manifold, Gaussian or
# power law, mask kinds, d_M, ...) and shape. Past dynamo's default of 8 it would silently run
# FlexAttention uncompiled, which materialises the (Nq, Nk) scores; past this many it warns.
COMPILED_VARIANTS = 64


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _run_compiled(*args, **kwargs) -> torch.Tensor:
    """The compiled FlexAttention; uncompiled, with a warning, once :data:`COMPILED_VARIANTS`
    variants exist."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        with torch._dynamo.config.patch(recompile_limit=COMPILED_VARIANTS, fail_on_recompile_limit_hit=True):
            return _compiled_flex()(*args, **kwargs)
    except FailOnRecompileLimitHit:
        from torch.nn.attention.flex_attention import flex_attention

        warnings.warn(
            f"levyattn: the flex backend has reached its limit of {COMPILED_VARIANTS} compiled variants (one "
            "per combination of options and shapes); this call runs FlexAttention uncompiled, which materialises "
            "the (Nq, Nk) scores. Fewer distinct shapes (padding to a few lengths) or backend='tiled' avoid it.",
            RuntimeWarning,
            stacklevel=4,
        )
        return flex_attention(*args, **kwargs)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kernel's arithmetic for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """x (float32 or float64) as [x] in dtype, or [hi, lo] with hi + lo == x to float32 accuracy."""
    if dtype not in LOW_PRECISION:
        return [x.to(dtype)]
    hi = x.to(dtype)
    return [hi, (x - hi.float()).to(dtype)]


def _pad16(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, (-x.shape[-1]) % 16))


def _augment(q: torch.Tensor, k: torch.Tensor, manifold: str, gaussian: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k whose product is the squared distance (Euclidean; the Gaussian's without the row's
    ||q||^2, see kernels.gaussian_logits_shifted) or the cosine (sphere), padded to 16."""
    if manifold == "sphere":
        return _pad16(F.normalize(q, dim=-1)), _pad16(F.normalize(k, dim=-1))
    dtype = q.dtype
    q32, k32 = q.to(_score_dtype(dtype)), k.to(_score_dtype(dtype))
    q_sq = _split(torch.zeros_like(q32[..., :1]) if gaussian else (q32 * q32).sum(-1, keepdim=True), dtype)
    k_sq = _split((k32 * k32).sum(-1, keepdim=True), dtype)
    ones_q = [torch.ones_like(q[..., :1])] * len(k_sq)
    ones_k = [torch.ones_like(k[..., :1])] * len(q_sq)
    q_aug = torch.cat([-2.0 * q, *q_sq, *ones_q], dim=-1)
    k_aug = torch.cat([k, *ones_k, *k_sq], dim=-1)
    return _pad16(q_aug), _pad16(k_aug)


def _per_head(value, num_heads: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A float or per-head tensor as a (H,) tensor of ``dtype``, indexed by head inside score_mod.

    Tensors rather than Python floats: a captured float is a compile-time constant, and
    every new value of alpha would compile the kernel again.
    """
    value = torch.as_tensor(value, dtype=dtype, device=device).detach()
    return value.reshape(-1).expand(num_heads).contiguous() if value.numel() == 1 else value.reshape(-1).contiguous()


def _indexer(mask: torch.Tensor):
    """Index a mask broadcastable to (B, H, Nq, Nk), given as 4-D, inside score_mod/mask_mod."""
    sizes = mask.shape

    def at(b, h, qi, ki):
        return mask[
            b if sizes[0] > 1 else 0,
            h if sizes[1] > 1 else 0,
            qi if sizes[2] > 1 else 0,
            ki if sizes[3] > 1 else 0,
        ]

    return at


def _structural_mask_mod(offset: int, causal: bool, exclude_self: bool):
    def mask_mod(b, h, qi, ki):
        allowed = qi >= 0  # all True, broadcast-shaped
        if causal:
            allowed = allowed & (ki <= qi + offset)
        if exclude_self:
            allowed = allowed & (ki != qi + offset)
        return allowed

    return mask_mod


@functools.lru_cache(maxsize=32)
def _structural_block_mask(nq: int, nk: int, causal: bool, exclude_self: bool, device: str):
    """The BlockMask of the causal and self-pair masks alone, built once per shape: building one
    evaluates the mask over all (Nq, Nk) pairs (2.7 GB and 18 s on a CPU at 16384 x 16384)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _structural_mask_mod(nk - nq, causal, exclude_self)
    return create_block_mask(mask_mod, None, None, nq, nk, device=device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    batch, heads, nq, head_dim = q.shape
    nk = k.shape[-2]
    q, k = call.prepare(q, k)
    gaussian = call.is_gaussian
    q_aug, k_aug = _augment(q, k, call.manifold, gaussian)
    kw = call.kernel_kwargs(head_dim)
    wide = _score_dtype(q.dtype)
    # alpha stays a Python float at exactly 2 (the Gaussian branch, one compilation).
    alpha = kw.pop("alpha") if gaussian else _per_head(alpha_in(kw.pop("alpha"), wide, q.device), heads, q.device, wide)
    bandwidth = _per_head(kw.pop("bandwidth"), heads, q.device, wide)
    kap = _per_head(kw.pop("kappa"), heads, q.device, wide)
    sphere = call.manifold == "sphere"
    user = call.attn_mask  # 4-D (fractional_attention gives it its leading 1s)
    additive = _indexer(user) if user is not None and user.dtype != torch.bool else None
    keep = _indexer(user) if user is not None and user.dtype == torch.bool else None
    offset = nk - nq

    def score_mod(score, b, h, qi, ki):
        sq = 2.0 - 2.0 * score if sphere else score
        if gaussian and not sphere:  # sq without the row's ||q||^2: any sign, no clamp
            out = sq.to(wide) * (-1.0 / (kap[h] * kap[h] * bandwidth[h]))
        else:
            a = alpha if gaussian else alpha[h]
            out = log_phi_from_sq(sq.to(wide), alpha=a, bandwidth=bandwidth[h], kappa=kap[h], **kw)
        if additive is not None:
            out = out + additive(b, h, qi, ki).to(wide)
        return out

    block_mask = None
    if keep is None and (call.is_causal or call.exclude_self):
        block_mask = _structural_block_mask(nq, nk, call.is_causal, call.exclude_self, str(q.device))
    elif keep is not None:
        structural = _structural_mask_mod(offset, call.is_causal, call.exclude_self)

        def mask_mod(b, h, qi, ki):
            return structural(b, h, qi, ki) & keep(b, h, qi, ki)

        b_size, h_size = (n if size > 1 else None for n, size in ((batch, user.shape[0]), (heads, user.shape[1])))
        block_mask = create_block_mask(mask_mod, b_size, h_size, nq, nk, device=q.device)
    return _run_compiled(q_aug, k_aug, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
