"""What every backend shares: the validated call (``AttentionCall``), masks, safe log-sum-exp.

Mask conventions (as ``scaled_dot_product_attention``):
- a boolean ``attn_mask`` says where attention is *allowed* (True = keep);
- a float ``attn_mask`` is added to ``log Phi`` (so ``-inf`` removes a pair);
- ``is_causal`` and ``exclude_self`` use the *bottom-right* alignment: query ``i`` of
  ``Nq`` sits at key position ``i + (Nk - Nq)``. With Nq == Nk this is the usual causal
  mask (and SDPA's); with Nq < Nk it is what decoding with a key/value cache needs: the
  last query sees every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from levyattn.kernels import Scalar, gaussian_logits_shifted, intrinsic_dim, kappa, log_phi_from_sq, squared_distances
from levyattn.kernels import center as center_on_keys

# Input dtypes that ``reference`` and ``tiled`` (and every backend on the CPU) compute in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionCall:
    """One validated call of ``fractional_attention`` (tensors are checked by the caller)."""

    alpha: Scalar
    bandwidth: Scalar
    manifold: str
    rescale: bool
    d_intrinsic: float | None
    sphere_radius: float
    density_a: float
    attn_mask: torch.Tensor | None
    is_causal: bool
    exclude_self: bool
    # q and k arrive divided by this power of two (so that squared distances stay finite), and
    # kappa is divided by it too: z = ||q - k|| / kappa is unchanged, exactly.
    length_unit: float = 1.0

    def kernel_kwargs(self, head_dim: int) -> dict:
        """Keyword arguments of :func:`levyattn.kernels.log_phi_from_sq` for this call."""
        return dict(
            alpha=self.alpha,
            bandwidth=self.bandwidth,
            d_intrinsic=intrinsic_dim(head_dim, self.manifold, self.d_intrinsic),
            kappa=kappa(self.alpha, head_dim, self.rescale, self.manifold) / self.length_unit,
            manifold=self.manifold,
            sphere_radius=self.sphere_radius,
        )

    @property
    def is_gaussian(self) -> bool:
        return not isinstance(self.alpha, torch.Tensor) and self.alpha >= 2

    def prepare(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per call, before tiling: centre (Euclidean) so distances are well conditioned,
        on the keys that the user's mask leaves to some query."""
        if self.manifold == "euclidean":
            return center_on_keys(q, k, self.keys_in_use())
        return q, k

    def keys_in_use(self) -> torch.Tensor | None:
        """Bool, broadcastable to (B, H, Nk): the keys the user's mask keeps for at least one
        query; None without a mask."""
        if self.attn_mask is None:
            return None
        allowed = allowed_pairs(self.attn_mask.detach())
        return allowed.any(-2) if allowed.dim() >= 2 else allowed

    def logits(self, q: torch.Tensor, k: torch.Tensor, q_start: int, nq: int, nk: int | None = None) -> torch.Tensor:
        """Masked ``log Phi`` for the query rows ``q_start .. q_start + q.shape[-2]`` of ``nq``
        against ``k``, the first ``k.shape[-2]`` of ``nk`` keys (default: all of them); for the
        Euclidean Gaussian without the density term, less the row's constant
        (:func:`gaussian_logits_shifted`), which the normalisation over the row removes (the
        density term's column sums over the queries need every row's own constant).

        q, k must have gone through :meth:`prepare`. Returns (B, H, bq, k.shape[-2]).
        """
        kw = self.kernel_kwargs(q.shape[-1])
        if self.manifold == "euclidean" and self.is_gaussian and not self.density_a:
            logits = gaussian_logits_shifted(q, k, 1.0 / (kw["kappa"] ** 2 * kw["bandwidth"]))
        else:
            logits = log_phi_from_sq(squared_distances(q, k, self.manifold), **kw)
        nk = k.shape[-2] if nk is None else nk
        mask = self.mask_rows(q_start, q_start + q.shape[-2], nq, nk, q.device, k.shape[-2])
        return apply_mask(logits, mask)

    def mask_rows(
        self, q_start: int, q_end: int, nq: int, nk: int, device: torch.device, key_stop: int | None = None
    ) -> torch.Tensor | None:
        """The mask for query rows ``q_start:q_end`` (and keys ``0 .. key_stop``, default Nk):
        bool (True = keep), float (additive) or None."""
        user, keep = self.mask_parts(q_start, q_end, nq, nk, device, key_stop)
        return user if keep is None else combine_keep(user, keep)

    def mask_parts(
        self, q_start: int, q_end: int, nq: int, nk: int, device: torch.device, key_stop: int | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`mask_rows` in its two parts, not combined: the user's mask for these rows (as
        given: bool or additive, broadcastable) and the (q_end - q_start, key_stop) bool causal /
        self-pair keep, each None when absent. Combining a per-batch padding mask with the
        per-row keep would materialise a (B, H, rows, Nk) mask; kept apart, both stay small.
        ``key_stop`` (default Nk) restricts both to the keys ``0 .. key_stop``."""
        key_stop = nk if key_stop is None else key_stop
        user = self.attn_mask
        if user is not None and user.dim() >= 2 and user.shape[-2] != 1:
            user = user[..., q_start:q_end, :]
        if user is not None and user.dim() >= 1 and user.shape[-1] != 1 and key_stop < nk:
            user = user[..., :key_stop]
        causal = self.is_causal and q_start < nq - 1  # the last query sees every key (decoding)
        if not (causal or self.exclude_self):
            return user, None
        return user, structural_keep(q_start, q_end, nq, nk, causal, self.exclude_self, device, key_stop)

    @property
    def skips_causal_keys(self) -> bool:
        """Whether a tile may leave out the keys causal masking hides from all of its rows: with
        causal masking, except with the density term (its column sums span every key)."""
        return self.is_causal and not self.density_a

    def key_stop(self, q_end: int, nq: int, nk: int) -> int:
        """Keys ``0 .. key_stop`` are the ones a tile of query rows before ``q_end`` computes:
        all of them, or (:attr:`skips_causal_keys`) those its last row may see. At least 1, so
        a tile is never empty (rows that see no key are masked as usual)."""
        if not self.skips_causal_keys:
            return nk
        return max(1, min(nk, q_end + nk - nq))


def structural_keep(
    q_start: int,
    q_end: int,
    nq: int,
    nk: int,
    is_causal: bool,
    exclude_self: bool,
    device,
    key_stop: int | None = None,
) -> torch.Tensor:
    """(q_end - q_start, key_stop) bool (key_stop defaults to Nk): causal and/or self-pair
    exclusion, bottom-right aligned."""
    key_stop = nk if key_stop is None else key_stop
    rows = torch.arange(q_start, q_end, device=device).unsqueeze(-1) + (nk - nq)
    cols = torch.arange(key_stop, device=device)
    keep = torch.ones(q_end - q_start, key_stop, dtype=torch.bool, device=device)
    if is_causal:
        keep &= cols <= rows
    if exclude_self:
        keep &= cols != rows
    return keep


def allowed_pairs(mask: torch.Tensor) -> torch.Tensor:
    """The pairs a bool (True = keep) or additive mask lets through, as bool: an additive entry
    removes its pair only when it is -inf (NaN lets it through, and poisons it)."""
    return mask if mask.dtype == torch.bool else mask != float("-inf")


def nonfinite_mask_entries(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool of the mask's shape: the NaN and +inf entries of an additive mask (-inf removes a
    pair); None for a bool mask or none."""
    if mask is None or mask.dtype == torch.bool:
        return None
    return ~(mask.detach() < float("inf"))


def scan_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, peaks=None
) -> tuple[bool, float, float]:
    """One pass over each input and one read back: (whether the call is plain, a bound on the
    magnitudes of q and k, a bound on the magnitudes of v).

    Plain means every value of q, k, v is finite and not huge (each tensor's 2-norm is finite)
    and the additive mask has no NaN or +inf; the bounds are then the 2-norms. ``peaks``, where
    given, is a function of (q, k, v) returning the largest magnitudes themselves, ``inf`` where
    an entry is not finite (the fused CPU kernel's one call); its bounds are then exact.
    Otherwise (rare) the caller finds the rows that depend on non-finite values
    (:func:`nonfinite_rows`), replaces those values, and takes exact bounds from
    :func:`largest_magnitudes`."""
    if not (q.numel() and k.numel() and v.numel()):
        return True, 0.0, 0.0  # an empty output: nothing to poison or overflow
    bounds = [] if peaks is not None else [_norm(x.detach()) for x in (q, k, v)]
    if mask is not None and mask.is_floating_point() and mask.numel():  # q, k, v share a dtype
        bounds.append(mask.detach().amax().clamp_min(0).to(q.dtype))  # +inf where too big: slow path
    values = torch.stack(bounds).tolist() if bounds else []
    if peaks is not None:
        values = [*peaks(q, k, v), *values]  # (q and k, v, mask)
    if not all(map(math.isfinite, values)):
        return False, math.inf, math.inf
    if peaks is not None:
        return True, values[0], values[1]
    return True, max(values[:2]), values[2]


def largest_magnitudes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """(the largest magnitude in q and k, the largest in v), of finite, non-empty tensors: the
    exact bounds of :func:`scan_inputs`' slow path."""
    q_peak, k_peak, v_peak = (torch.linalg.vector_norm(x.detach(), float("inf")) for x in (q, k, v))
    qk, v_bound = torch.stack([torch.maximum(q_peak, k_peak), v_peak]).tolist()
    return qk, v_bound


def _norm(x: torch.Tensor) -> torch.Tensor:
    """The 2-norm of all of x's entries (not finite where their sum of squares overflows),
    reading x once: from a BLAS dot product where x is large and contiguous (as fast as a sum;
    ``vector_norm`` takes twice as long there), else ``vector_norm`` (half a dot's fixed cost
    on a small tensor and, unlike ``aminmax``, as fast on a transposed view)."""
    if x.is_contiguous() and x.numel() >= 1 << 16:
        flat = x.view(-1)
        return torch.dot(flat, flat).sqrt()
    return torch.linalg.vector_norm(x)


def nonfinite_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """The output rows that depend on a non-finite value of q (B, H, Nq, d), k (B, H, Nk, d),
    v (B, H, Nk, dv) or the additive mask: (B, H, Nq) bool (:func:`scan_inputs` says first,
    cheaply, whether there is any).

    Row i depends on q_i and, for every key j that its masks let through (bool True, additive
    not -inf, causal, self-pair), on k_j, v_j and the mask entry (i, j); with the density term
    also on the column sums C_j of those keys, which depend on every query that sees key j and
    on its mask entries. Computed in blocks of rows: memory O(block * Nk), like ``tiled``.
    """
    (batch, heads, nq, _), nk = q.shape, k.shape[-2]
    bad_q = ~torch.isfinite(q.detach()).all(-1)  # (B, H, Nq)
    bad_k = ~torch.isfinite(k.detach()).all(-1)  # (B, H, Nk)
    bad_key = bad_k | ~torch.isfinite(v.detach()).all(-1)
    block = max(1, (1 << 22) // max(1, batch * heads * nk))

    def row_blocks():
        """(start, stop, allowed (B|1, H|1, rows, Nk), bad mask entries there or None)."""
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            mask = call.mask_rows(start, stop, nq, nk, q.device)
            allowed = torch.ones((), dtype=torch.bool, device=q.device) if mask is None else allowed_pairs(mask)
            bad = nonfinite_mask_entries(mask)
            yield start, stop, allowed.expand(batch, heads, stop - start, nk), bad

    if call.density_a:
        bad_col = bad_k.clone()
        for start, stop, allowed, bad in row_blocks():
            hits = bad_q[..., start:stop, None] if bad is None else bad_q[..., start:stop, None] | bad
            bad_col |= (allowed & hits).any(-2)
        bad_key = bad_key | bad_col
    rows = bad_q.clone()
    for start, stop, allowed, bad in row_blocks():
        hits = bad_key[..., None, :] if bad is None else bad_key[..., None, :] | bad
        rows[..., start:stop] |= (allowed & hits).any(-1)
    return rows


def mask_without_nonfinite(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An additive mask with its NaN and +inf entries set to 0 (gradient 0 there); -inf stays."""
    bad = nonfinite_mask_entries(mask)
    return mask if bad is None else torch.where(bad, 0.0, mask)


def combine_keep(mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """Restrict a bool (True = keep) or additive mask, or None, to the pairs in ``keep``."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool (True = keep) or additive mask as an additive one of ``dtype`` (0 keeps, -inf removes)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def additive_sum(masks: tuple[torch.Tensor | None, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Several masks (None, bool or additive; broadcastable together) as one additive mask of
    ``dtype``. For ``scaled_dot_product_attention``, which takes one mask and uses a float one as
    it is, where it converts a boolean one in forward and again in backward."""
    parts = [additive_mask(m, dtype) for m in masks if m is not None]
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def apply_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.to(logits.dtype)


def safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that returns -inf (with zero gradient, never NaN) for all -inf slices."""
    peak = x.amax(dim=dim, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(x - peak).sum(dim=dim, keepdim=True)
    empty = total == 0
    out = torch.log(torch.where(empty, torch.ones_like(total), total)) + peak
    out = torch.where(empty, torch.full_like(out, float("-inf")), out)
    return out.squeeze(dim)


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row log-softmax over the last dim whose fully masked (all -inf) rows stay -inf, never NaN."""
    peak = finite_or_zero(logits.amax(-1, keepdim=True))
    total = torch.exp(logits - peak).sum(-1, keepdim=True)
    return logits - peak - torch.log(total.clamp_min(torch.finfo(total.dtype).tiny))


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax whose fully masked rows are 0 (not NaN), with zero gradient there.

    Divided by the row's sum rather than shifted by its log-sum-exp: where the row's maximum is
    far from 0 (a float mask of -1e9 on a whole row), ``max + log(sum)`` rounds to the maximum
    and the weights would sum to the number of keys."""
    peak = finite_or_zero(logits.amax(-1, keepdim=True)).detach()
    weights = torch.exp(logits - peak)
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def mask_from_zero(mask: torch.Tensor | None, density: bool) -> torch.Tensor | None:
    """An additive mask less its largest finite entry in each row, or with the density term in
    each (batch, head) (a bool mask, or none, as it is).

    Row normalisation does not see a constant added to a row, but the backends' row log-sum-exp,
    ``max + log(sum)``, loses ``log(sum)`` to rounding once the row's maximum is large: a row
    masked at -1e9 or the dtype's lowest value (padding queries of a float padding mask) had
    weights summing to its number of keys in ``reference``, and every backend's gradients were as
    many times too large. The density term's column sums see a row's constant, but not one shared
    by all of a head's entries, which its column log-sum-exps lose the same way. A row (a head)
    whose largest entry is 0, or that is all -inf, is left exactly as it is; dimensions the mask
    is expanded along (stride 0) stay of size 1, not materialised."""
    if mask is None or mask.dtype == torch.bool or mask.numel() == 0:
        return mask
    mask = mask[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in mask.stride())]
    return mask - finite_or_zero(mask.detach().amax((-2, -1) if density else -1, keepdim=True))
