"""``fractional_attention``: the FNA operator with the calling convention of
``torch.nn.functional.scaled_dot_product_attention``.

Backends and the ``auto`` rule
------------------------------
- ``reference``: materialises the weights; the ground truth; the only one returning weights.
- ``tiled``: query blocks with recomputation in backward; memory linear in Nq. On the CPU in
  float32 and float64 its Euclidean path (float alpha and bandwidth, no density term) runs a fused
  C++ kernel built on first use (:mod:`levyattn.backends.fused_cpu`; ``LEVYATTN_COMPILE=0`` to
  disable).
- ``sdpa``: alpha == 2 on the Euclidean manifold, through PyTorch's fused softmax attention.
- ``flex``: FlexAttention ``score_mod``, any alpha; training on GPU, inference on CPU.

``auto`` takes, in order: ``reference`` when weights are asked for; on the CPU, ``tiled`` when
its fused kernel takes a call that autograd will differentiate (at alpha = 2 measured faster
than ``sdpa``, whose extra dimension costs PyTorch's kernel 1.1-2.2x softmax's time for
forward+backward against the fused kernel's 0.8-1.2x; without gradients ``sdpa`` adds no
dimension and was ahead from 2**23 query-key pairs up: ``benchmarks/tiled_paths.py --alpha 2``);
``sdpa`` when it can compute the call exactly; ``flex`` on CUDA when it can; otherwise ``tiled``
(measured faster than ``reference`` for forward+backward at every size down to 16 x 1 x 128 x 32;
for one decoding query the two trade places from run to run). Naming a backend that cannot
compute a call raises ``ValueError``: no backend silently computes different math.

Precision: float16 and bfloat16 inputs are computed in float32 by ``reference`` and
``tiled`` (and by every backend on the CPU), and the result is cast back. Tensor alpha and
bandwidth are computed in that dtype too (their gradients come back in their own).

Every backend computes the same function, on every input: non-finite values, empty
dimensions and every gradient included (see :func:`fractional_attention`); the non-finite
rule is applied here, once, around whichever backend runs. ``tests/backends`` holds them to
``reference``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from levyattn.backends import flex, fused_cpu, reference, sdpa, tiled
from levyattn.backends.common import (
    LOW_PRECISION,
    AttentionCall,
    finite_or_zero,
    largest_magnitudes,
    mask_from_zero,
    mask_without_nonfinite,
    nonfinite_rows,
    scan_inputs,
)
from levyattn.config import (
    Scalar,
    check_alpha,
    check_bandwidth,
    check_bool,
    check_d_intrinsic,
    check_density_a,
    check_kernel_scale,
    check_manifold,
    check_positive,
)
from levyattn.kernels import alpha_in

BACKENDS = ("auto", "reference", "tiled", "sdpa", "flex")


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq, dim), got {tuple(t.shape)} ({t.dim()}-D)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must share a device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same head dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v need the same sequence length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(
            "q, k and v need the same (batch, heads), got "
            f"{tuple(q.shape[:2])}, {tuple(k.shape[:2])}, {tuple(v.shape[:2])}"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"head dim must be > 0, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def check_mask(attn_mask, q, k) -> torch.Tensor | None:
    """``attn_mask`` checked against q (B, H, Nq, d) and k (B, H, Nk, d), as a 4-D view; None
    for none."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = keep) or floating (added to log Phi), got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # Broadcasts to target: each of its sizes, aligned on the right, 1 or target's (a plain loop:
    # torch.broadcast_shapes costs tens of microseconds a call).
    shape = attn_mask.shape
    if len(shape) > 4 or any(size not in (1, full) for size, full in zip(reversed(shape), reversed(target))):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, Nq, Nk) = {target}"
        )
    # Backends index the mask by (batch, head, query, key): give it its leading 1s (a view).
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def per_head(name: str, value: Scalar, q: torch.Tensor) -> Scalar:
    """A tensor alpha/bandwidth: (H,) or scalar -> broadcastable (H, 1, 1), on q's device."""
    if not isinstance(value, torch.Tensor):
        return value
    heads = q.shape[1]
    if value.dim() == 0 or value.numel() == 1:
        return value.reshape(1, 1, 1)
    if value.dim() == 1 and value.shape[0] == heads:
        return value.reshape(heads, 1, 1)
    if value.dim() == 3 and value.shape == (heads, 1, 1):
        return value
    raise ValueError(
        f"{name} tensor must be a scalar or have one value per head ({heads},), got shape {tuple(value.shape)}"
    )


def fractional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: Scalar = 1.2,
    bandwidth: Scalar = 1.0,
    manifold: str = "euclidean",
    rescale: bool = True,
    d_intrinsic: float | None = None,
    sphere_radius: float = 1.0,
    density_a: float = 0.0,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    exclude_self: bool = False,
    return_weights: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fractional neural attention (docs/operator.md, "The operator, per head").

    Args:
        q: (B, H, Nq, d) queries.  k: (B, H, Nk, d) keys.  v: (B, H, Nk, dv) values.
        alpha: Lévy index in (0, 2]; a float, or a tensor with one value per head (H,).
        bandwidth: eps > 0; a float or a per-head tensor.
        manifold: "euclidean" or "sphere".
        rescale: divide Euclidean distances by kappa.
        d_intrinsic: d_M of the power-law exponent (default d, or d - 1 on the sphere).
        sphere_radius: r > 0, the sphere's radius.
        density_a: Coifman-Lafon density normalisation in [0, 1].
        attn_mask: bool (True = keep) or float (added to log Phi), broadcastable to
            (B, H, Nq, Nk).
        is_causal: query i attends to keys j <= i + (Nk - Nq) (bottom-right aligned; equal
            to SDPA's for Nq == Nk, and right for decoding with a key/value cache).
        exclude_self: the pair (i, i + Nk - Nq) gets weight 0 (shared query/key projection).
        return_weights: also return the (B, H, Nq, Nk) row-stochastic weights.
        backend: "auto", "reference", "tiled", "sdpa" or "flex" (see the module docstring).

    Returns:
        (B, H, Nq, dv) output, or (output, weights). A query with no allowed key gets
        output 0 and weights 0; so does every query when Nk = 0. An empty batch, head,
        query or value dimension gives an empty output; gradients there are 0.

    Non-finite inputs (every backend, as ``reference``):
        Output row i depends on q_i and, for every key j that the masks let through (bool
        True, additive not -inf, causal, self-pair), on k_j, v_j and the mask entry (i, j);
        with ``density_a`` also on every query and mask entry that reaches such a key's
        column sum. Masked-out pairs never influence anything. A row (output and weights,
        every column) is NaN exactly when a value it depends on is NaN or +-Inf, or is a NaN
        or +inf additive mask entry (+inf is no weight: ``Phi * e**inf`` has no row
        normalisation). Non-finite inputs get gradient 0, and NaN rows pass no gradient
        back, so the other rows' gradients stay those of the finite inputs.
    """
    _check_tensors(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    alpha, bandwidth = check_alpha(alpha), check_bandwidth(bandwidth)
    check_kernel_scale(alpha, bandwidth)
    call = AttentionCall(
        alpha=per_head("alpha", alpha, q),
        bandwidth=per_head("bandwidth", bandwidth, q),
        manifold=check_manifold(manifold),
        rescale=check_bool("rescale", rescale),
        d_intrinsic=check_d_intrinsic(d_intrinsic),
        sphere_radius=check_positive("sphere_radius", sphere_radius),
        density_a=check_density_a(density_a),
        attn_mask=check_mask(attn_mask, q, k),
        is_causal=check_bool("is_causal", is_causal),
        exclude_self=check_bool("exclude_self", exclude_self),
    )
    return attend(q, k, v, call, return_weights=check_bool("return_weights", return_weights), backend=backend)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttentionCall,
    *,
    return_weights: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`fractional_attention` of arguments already validated: q, k, v as it checks them,
    ``call`` with its options checked, tensor alpha and bandwidth shaped by :func:`per_head` and a
    4-D mask; ``backend`` one of ``BACKENDS``. Modules, whose options are checked once when they
    are built, call this to spare each call the checks (a fixed cost that dominates decoding)."""
    if return_weights and backend not in ("auto", "reference"):
        raise ValueError(f"return_weights=True needs backend 'reference' or 'auto', got {backend!r}")
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, call.alpha, call.bandwidth, call.attn_mask) if isinstance(t, torch.Tensor)
    )
    chosen = backend if backend != "auto" else _auto(call, q, needs_grad, return_weights)
    if chosen == "sdpa":
        reason = sdpa.unsupported(call, q)
    elif chosen == "flex":
        reason = flex.unsupported(call, q, needs_grad)
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"backend={chosen!r} cannot compute this call: {reason}")

    dtype = q.dtype
    if _computed_dtype(q, chosen) != dtype:
        q, k, v = q.float(), k.float(), v.float()
    call = _parameters_as(call, q)
    # Where the fused kernel will run, its own scan: one call.
    fused = chosen == "tiled" and tiled.runs_fused_kernel(call, q.device, q.dtype)
    if fused and not needs_grad and _is_decoding(q, k, v, call):
        out = _decode_if_plain(q, k, v, call)
        if out is not None:
            return out.to(dtype)
    plain, qk_peak, v_peak = scan_inputs(q, k, v, call.attn_mask, fused_cpu.peaks if fused else None)
    poisoned = None
    if not plain:
        poisoned = nonfinite_rows(q, k, v, call)
        # Computed on the finite values; the rows that depend on the others become NaN below.
        q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
        call = dataclasses.replace(call, attn_mask=mask_without_nonfinite(call.attn_mask))
        qk_peak, v_peak = largest_magnitudes(q, k, v)
    if q.dtype != torch.float64 and _needs_float64(q, call, qk_peak):
        # No unit of length helps (see _needs_float64); in float64 the numbers fit.
        q, k, v = q.double(), k.double(), v.double()
        mask = call.attn_mask
        if mask is not None and mask.is_floating_point():
            call = dataclasses.replace(call, attn_mask=mask.double())
        call = _parameters_as(call, q)
        fused = chosen == "tiled" and tiled.runs_fused_kernel(call, q.device, q.dtype)
    call = dataclasses.replace(call, attn_mask=mask_from_zero(call.attn_mask, bool(call.density_a)))
    q, k, call = _in_length_unit(q, k, call, qk_peak)
    value_unit = _value_unit(v, v_peak)
    if value_unit != 1.0:
        v = v / value_unit
    weights = None
    if 0 in (*q.shape[:3], k.shape[-2], v.shape[-1]):
        out, weights = _empty_result(q, k, v, call)
    elif chosen == "reference":
        out, weights = reference.attention(q, k, v, call, return_weights)
    elif chosen == "tiled":
        out = tiled.attention(q, k, v, call, fused=fused)
    elif chosen == "sdpa":
        out = sdpa.attention(q, k, v, call, needs_grad)
    else:
        out = flex.attention(q, k, v, call)
    if value_unit != 1.0:
        out = out * value_unit
    if poisoned is not None:
        out = out.masked_fill(poisoned.unsqueeze(-1), float("nan"))
    out = out.to(dtype)
    if return_weights:
        if poisoned is not None:
            weights = weights.masked_fill(poisoned.unsqueeze(-1), float("nan"))
        return out, weights.to(dtype)
    return out


def _is_decoding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> bool:
    """One query row against keys and values that are not empty, the power law, with no mask or
    a bool one (a float mask has values of its own to check): a decoding step, which the fused
    kernel checks as it reads it. (The Gaussian's logits keep their shift:
    :func:`kernels.gaussian_logits_shifted`.)"""
    mask = call.attn_mask
    return (
        q.shape[-2] == 1
        and not call.is_gaussian
        and q.numel() > 0
        and k.numel() > 0
        and v.numel() > 0
        and (mask is None or mask.dtype == torch.bool)
    )


def _decode_if_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor | None:
    """A decoding step through the fused kernel, which takes the largest entries of q, k and v as
    it reads them (a check of its own would read the key/value cache once more): the output when
    they are finite and need no change of unit or dtype, as they almost always are; else None, and
    the caller runs the checked path, which handles them."""
    out, qk_peak, v_peak = tiled.decode(q, k, v, call)
    if not (math.isfinite(qk_peak) and math.isfinite(v_peak)):
        return None
    if _in_length_unit(q, k, call, qk_peak)[2] is not call or _value_unit(v, v_peak) != 1.0:
        return None
    if q.dtype != torch.float64 and _needs_float64(q, call, qk_peak):
        return None
    return out


def _parameters_as(call: AttentionCall, q: torch.Tensor) -> AttentionCall:
    """The call with tensor alpha and bandwidth on q's device and in q's dtype (differentiably:
    a float64 parameter of a float32 model gets its gradient as float64); an alpha below 2 stays
    below 2 (:func:`~levyattn.kernels.alpha_in`)."""
    if not isinstance(call.alpha, torch.Tensor) and not isinstance(call.bandwidth, torch.Tensor):
        return call
    alpha = alpha_in(call.alpha, q.dtype, q.device) if isinstance(call.alpha, torch.Tensor) else call.alpha
    bandwidth = call.bandwidth
    if isinstance(bandwidth, torch.Tensor):
        bandwidth = bandwidth.to(device=q.device, dtype=q.dtype)
    return dataclasses.replace(call, alpha=alpha, bandwidth=bandwidth)


def _power_of_two_above(ratio: float) -> float:
    """The smallest power of two 2**s >= ratio, s >= 0 (1.0 for ratio <= 1)."""
    return 1.0 if ratio <= 1.0 else math.ldexp(1.0, math.ceil(math.log2(ratio)))


_FLOAT32_MAX, _FLOAT64_MAX = torch.finfo(torch.float32).max, torch.finfo(torch.float64).max


def _largest(q: torch.Tensor) -> float:
    """The largest finite value of the dtype q is computed in (float32 under float16 and
    bfloat16, whose kernels accumulate in float32)."""
    return _FLOAT64_MAX if q.dtype == torch.float64 else _FLOAT32_MAX


def _in_length_unit(q, k, call: AttentionCall, qk_peak: float):
    """(q, k, call) with q and k divided by a power of two where their squared distances
    could overflow (Euclidean calls). Exact: the call's kappa is divided by the same power of
    two (``AttentionCall.length_unit``), so z = ||q - k|| / kappa, the power law's and the
    Gaussian's logits are unchanged; only the sums on the way to them shrink."""
    if call.manifold != "euclidean":
        return q, k, call
    # After centring, |q_i - k_j| <= 4 * peak per coordinate, so sq <= 16 d peak**2; keep it
    # (and the sums beside it) under a quarter of the largest value.
    unit = _power_of_two_above(qk_peak / math.sqrt(_largest(q) / (64 * q.shape[-1])))
    if unit == 1.0:
        return q, k, call
    return q / unit, k / unit, dataclasses.replace(call, length_unit=unit)


def _needs_float64(q: torch.Tensor, call: AttentionCall, qk_peak: float) -> bool:
    """Whether a number of this call's kernel could pass the largest value of q's dtype, which
    no unit of length changes (a unit scales kappa with the distances): the power law's
    scale eps**(-1/alpha), or the scale times the largest distance z = ||q - k|| / kappa (after
    centring ||q - k|| <= 4 sqrt(d) peak; z <= pi r on the sphere), or the Gaussian's logits
    (terms up to 12 d peak**2 / (kappa**2 eps); (pi r)**2 / eps on the sphere). In float32 that takes a
    small bandwidth at a small alpha (eps = 1e-12 at alpha = 0.3), or coordinates near 1e19
    at alpha = 2."""
    d = q.shape[-1]
    tiny = 1e-300  # a peak of 0: no distance
    kw = call.kernel_kwargs(d)
    alpha, eps, kap = kw["alpha"], kw["bandwidth"], kw["kappa"]
    # Logarithms throughout; floats (the usual call) with math, per-head tensors with torch.
    tensors = isinstance(alpha, torch.Tensor) or isinstance(eps, torch.Tensor)
    if tensors:
        alpha, eps, kap = (torch.as_tensor(x, dtype=torch.float64).detach() for x in (alpha, eps, kap))
    lib = torch if tensors else math
    if call.manifold == "sphere":  # kappa is 1
        log_z = math.log(math.pi * call.sphere_radius)
        log_gaussian = 2 * log_z - lib.log(eps)
    else:
        log_z = math.log(max(4 * math.sqrt(d) * qk_peak, tiny)) - lib.log(kap)
        log_gaussian = math.log(max(12 * d * qk_peak**2, tiny)) - 2 * lib.log(kap) - lib.log(eps)
    log_scale = -lib.log(eps) / (alpha.clamp_max(2) if tensors else min(alpha, 2.0))  # eps**(-1/alpha)
    if tensors:
        log_power = torch.maximum(log_scale, log_scale + log_z)
        per_head = torch.where(alpha >= 2, log_gaussian, log_power)
        log_largest = float(per_head.max()) if per_head.numel() else -math.inf  # no heads
    else:
        log_largest = log_gaussian if alpha >= 2 else max(log_scale, log_scale + log_z)
    return log_largest > math.log(_largest(q) / 4)


def _value_unit(v: torch.Tensor, v_peak: float) -> float:
    """The power of two to divide v by (and multiply the output by) so that the unnormalised
    sums of weights (each <= 1) times values, over Nk keys, stay finite: 1.0 almost always."""
    return _power_of_two_above(v_peak * 4 * max(1, v.shape[-2]) / _largest(v))


def _empty_result(q, k, v, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, H, Nq, dv) and weights (B, H, Nq, Nk) of a call with an empty dimension: zeros
    (no key: output 0), differentiable with gradient 0 for every input."""
    inputs = (q, k, v, call.alpha, call.bandwidth, call.attn_mask)
    # The sum of no elements of each input: 0, in the graph of every input that requires grad.
    zero = sum(x.reshape(-1)[:0].sum() for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point())
    out = q.new_zeros(*q.shape[:3], v.shape[-1]) + zero.to(q.dtype)
    weights = q.new_zeros(*q.shape[:3], k.shape[-2]) + zero.to(q.dtype)
    return out, weights


def _computed_dtype(q: torch.Tensor, backend: str) -> torch.dtype:
    """The dtype ``backend`` computes in for inputs like ``q``: float16 and bfloat16 go to
    float32 on the CPU, in ``reference`` and ``tiled`` everywhere, and in ``sdpa`` for float16."""
    low = q.dtype in LOW_PRECISION and (
        q.device.type == "cpu" or backend in ("reference", "tiled") or (backend == "sdpa" and q.dtype == torch.float16)
    )
    return torch.float32 if low else q.dtype


def _auto(call: AttentionCall, q, needs_grad: bool, return_weights: bool) -> str:
    if return_weights:
        return "reference"
    if needs_grad and tiled.runs_fused_kernel(call, q.device, _computed_dtype(q, "tiled")):
        return "tiled"
    if sdpa.unsupported(call, q) is None:
        return "sdpa"
    if q.device.type == "cuda" and flex.unsupported(call, q, needs_grad) is None:
        return "flex"
    return "tiled"
