"""The tiled backend: memory linear in sequence length, on the CPU and the GPU.

Forward walks over blocks of queries: for each block it forms the masked ``log Phi``
against the keys it may see (all of them, or with causal masking those up to its last
query's position), its row log-sum-exp and the output, and keeps only the outputs and
the (B, H, Nq) log-sum-exp. Backward walks the blocks again, recomputes each block's
weights from the saved log-sum-exp (as FlashAttention does) and pushes the gradient of
the logits back through the kernel with autograd, one block at a time. Peak extra
memory is O(block * Nk) instead of O(Nq * Nk).

The Euclidean hot path (float alpha and bandwidth, no density term) writes the chain rule
out instead. On the CPU in float32 and float64 it runs the fused C++ kernel
(:mod:`levyattn.backends.fused_cpu`: query x key blocks that stay in cache, as PyTorch's own
CPU attention kernel does) unless ``LEVYATTN_COMPILE=0`` or its build failed; otherwise, and on
the GPU, the tile loop below. A float mask that requires grad (a learnable bias) gets its
gradient from the fused kernel, or from the generic tile loop (``_TiledFNA``), whose backward
differentiates the mask with the rest of the logits.

Density normalisation (``density_a > 0``) needs the column sums ``C_j`` over all
queries: one extra pass computes them first, and backward adds their coupling term.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from levyattn.backends import fused_cpu
from levyattn.backends.common import AttentionCall, additive_mask, finite_or_zero, safe_logsumexp

# Elements of one (B, H, block, Nk) logits tile; 2**21 float32 values = 8 MiB. It bounds
# the extra memory; measured on 2 CPU cores (forward+backward, alpha 1.2), it was the
# fastest of 2**18..2**22 at (8, 4, 512, 16), (16, 4, 128, 16) and (1, 4, 4096, 64).
TILE_ELEMENTS = 1 << 21


# At least this many query rows per tile: thinner tiles make the matrix products inefficient
# (measured: at N = 16384, 32-row tiles were 1.3x slower than 64-row ones). Memory stays
# linear in Nk.
MIN_TILE_ROWS = 64


# With causal masking a tile computes only the keys its last query sees, so thinner tiles skip
# more of the masked triangle: at most this many rows. Measured on Euclidean tiles at
# (1, 4, N, 64), forward+backward: N = 1024, 43.8 ms against 69.2 with one 1024-row tile;
# N = 2048, 131.9 against 177.2 with 512-row tiles; N = 512 and 4096 unchanged.
CAUSAL_TILE_ROWS = 256


def block_size(batch_heads: int, nq: int, nk: int, head_dim: int = 64) -> int:
    """Query rows per (B, H, block, Nk) tile, at least MIN_TILE_ROWS.

    About TILE_ELEMENTS values at head dim 64, scaled with the head dim (clamped to 1/4..2x).
    With a small head dim the matmuls are cheap and the elementwise passes dominate, so tiles
    should stay in cache: measured at (8, 4, 512, 16) and (16, 4, 128, 16), 4x smaller tiles
    than at head dim 64 were 1.3x / 1.05x faster (forward+backward).
    """
    scale = min(2.0, max(0.25, head_dim / 64))
    return min(nq, max(MIN_TILE_ROWS, int(TILE_ELEMENTS * scale) // max(1, batch_heads * nk)))


def _column_log_sums(q, k, call, block):
    """log C_j = log sum_i Phi_ij over all (unmasked) queries: (B, H, Nk)."""
    nq = q.shape[-2]
    total = None
    for start in range(0, nq, block):
        part = safe_logsumexp(call.logits(q[..., start : start + block, :], k, start, nq), -2)
        total = part if total is None else torch.logaddexp(total, part)
    return finite_or_zero(total)


class _TiledFNA(torch.autograd.Function):
    """Any call; ``alpha``, ``bandwidth`` and ``mask`` (the call's own tensors, or None for a
    float / no mask) are inputs so that they get gradients."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, bandwidth, mask, call, block):
        call = dataclasses.replace(
            call,
            alpha=call.alpha if alpha is None else alpha,
            bandwidth=call.bandwidth if bandwidth is None else bandwidth,
            attn_mask=call.attn_mask if mask is None else mask,
        )
        nq, nk = q.shape[-2], k.shape[-2]
        col_bias = None
        log_col = None
        if call.density_a:
            log_col = _column_log_sums(q, k, call, block)
            col_bias = (-call.density_a * log_col).unsqueeze(-2)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        # Each row's log-sum-exp in two parts, its maximum and the log of its sum after the maximum:
        # where the maximum is large (a row masked at -1e9 with the density term, whose mask keeps
        # its rows' constants), their sum rounds to the maximum and the weights to the wrong sum.
        row_peak, log_total = q.new_empty(q.shape[:-1]), q.new_empty(q.shape[:-1])
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            kv = call.key_stop(stop, nq, nk)
            logits = call.logits(q[..., start:stop, :], k[..., :kv, :], start, nq, nk)
            if col_bias is not None:
                logits = logits + col_bias
            peak = finite_or_zero(logits.amax(-1, keepdim=True))  # 0 for a fully masked row
            weights = torch.exp(logits - peak)
            total = weights.sum(-1, keepdim=True)
            row_peak[..., start:stop], log_total[..., start:stop] = peak.squeeze(-1), total.log().squeeze(-1)
            out[..., start:stop, :] = (weights @ v[..., :kv, :]) / torch.where(total > 0, total, 1.0)
        ctx.save_for_backward(q, k, v, out, row_peak, log_total, log_col, alpha, bandwidth, mask)
        ctx.call = call
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, row_peak, log_total, log_col, alpha, bandwidth, mask = ctx.saved_tensors
        call, block = ctx.call, ctx.block
        nq, nk = q.shape[-2], k.shape[-2]
        log_total = finite_or_zero(log_total)  # -inf for a fully masked row, whose logits are all -inf
        delta = (grad_out * out).sum(-1)  # D_i = sum_j P_ij dP_ij
        col_bias = None if log_col is None else (-call.density_a * log_col).unsqueeze(-2)

        def block_weights(logits, start, stop):
            if col_bias is not None:
                logits = logits + col_bias
            rows = slice(start, stop)
            return torch.exp((logits - row_peak[..., rows].unsqueeze(-1)) - log_total[..., rows].unsqueeze(-1))

        def block_grad_scores(weights, start, stop):  # weights: (B, H, rows, kv) for the first kv keys
            grad_weights = grad_out[..., start:stop, :] @ v[..., : weights.shape[-1], :].transpose(-1, -2)
            grad_scores = weights * (grad_weights - delta[..., start:stop].unsqueeze(-1))
            # Each row of dS sums to 0 exactly; in float32 it does not (D_i comes from the saved
            # output), and d logit / d alpha (or bandwidth) is nearly constant along a row, so the
            # rounding error was summed with that large constant: the gradients of alpha and
            # bandwidth were 10-50x less accurate than ``reference``'s
            # (benchmarks/parameter_gradients.py). Removing the row sum along P, a term with zero
            # exact value, keeps them as accurate.
            return grad_scores - weights * grad_scores.sum(-1, keepdim=True)

        coupling = None
        if call.density_a:
            # d loss / d log C_j = -a * sum_i dS_ij needs every query block first.
            col_grad = torch.zeros_like(log_col)
            with torch.no_grad():
                for start in range(0, nq, block):
                    stop = min(nq, start + block)
                    logits = call.logits(q[..., start:stop, :], k, start, nq)
                    weights = block_weights(logits, start, stop)
                    col_grad += block_grad_scores(weights, start, stop).sum(-2)
            coupling = (-call.density_a * col_grad).unsqueeze(-2)

        need_q, need_k, need_v, need_alpha, need_bw, need_mask = ctx.needs_input_grad[:6]
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_v = torch.zeros_like(v) if need_v else None
        grad_alpha = torch.zeros_like(alpha) if need_alpha else None
        grad_bw = torch.zeros_like(bandwidth) if need_bw else None
        grad_mask = torch.zeros_like(mask) if need_mask else None
        k_leaf = k.detach().requires_grad_(need_k)
        alpha_leaf = alpha.detach().requires_grad_(need_alpha) if alpha is not None else None
        bw_leaf = bandwidth.detach().requires_grad_(need_bw) if bandwidth is not None else None
        mask_leaf = mask.detach().requires_grad_(need_mask) if mask is not None else None
        leaf_call = dataclasses.replace(
            call,
            alpha=call.alpha if alpha_leaf is None else alpha_leaf,
            bandwidth=call.bandwidth if bw_leaf is None else bw_leaf,
            attn_mask=call.attn_mask if mask_leaf is None else mask_leaf,
        )
        inputs_wanted = [need_q, need_k, need_alpha, need_bw, need_mask]
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            kv = call.key_stop(stop, nq, nk)
            q_leaf = q[..., start:stop, :].detach().requires_grad_(need_q)
            with torch.enable_grad():
                logits = leaf_call.logits(q_leaf, k_leaf[..., :kv, :], start, nq, nk)
            raw = logits.detach()
            weights = block_weights(raw, start, stop)
            if need_v:
                grad_v[..., :kv, :] += weights.transpose(-1, -2) @ grad_out[..., start:stop, :]
            grad_logits = block_grad_scores(weights, start, stop)
            if coupling is not None:
                grad_logits = grad_logits + torch.exp(raw - log_col.unsqueeze(-2)) * coupling
            leaves = [q_leaf, k_leaf, alpha_leaf, bw_leaf, mask_leaf]
            wanted = [x for x, w in zip(leaves, inputs_wanted) if w]
            if not wanted:
                continue
            grads = iter(torch.autograd.grad(logits, wanted, grad_logits))
            if need_q:
                grad_q[..., start:stop, :] = next(grads)
            if need_k:
                grad_k += next(grads)
            if need_alpha:
                grad_alpha += next(grads)
            if need_bw:
                grad_bw += next(grads)
            if need_mask:
                grad_mask += next(grads)
        return grad_q, grad_k, grad_v, grad_alpha, grad_bw, grad_mask, None, None


def _tile_keys_and_masks(call: AttentionCall, start: int, stop: int, nq: int, nk: int, like: torch.Tensor):
    """For the query rows ``start:stop``: how many keys the tile computes (all but those causal
    masking hides from every one of its rows) and the two mask parts over those keys, additive
    in ``like``'s dtype."""
    kv = call.key_stop(stop, nq, nk)
    user, keep = (additive_mask(m, like.dtype) for m in call.mask_parts(start, stop, nq, nk, like.device, kv))
    return kv, user, keep


def _add_masks_(logits, user, keep):
    for mask in (user, keep):
        if mask is not None:
            logits.add_(mask)


def _kernel_weights_(scores, user, keep, exponent, c, gaussian: bool):
    """One forward tile, in place: squared distances (B, H, bq, Nk) become the unnormalised
    weights ``exp(log Phi - row max)``. Returns the row max of ``log Phi`` and the row sum of
    the weights, both (B, H, bq, 1).

    ``log Phi = -sq * c`` (Gaussian) or ``-(d_M + alpha) log1p(c sqrt(sq))`` (power law);
    ``user`` (broadcastable to the tile) and ``keep`` (bq, Nk) are the two parts of the mask
    (:meth:`AttentionCall.mask_parts`), each additive (0 keeps, -inf removes) or None.
    """
    if gaussian:  # scores: ||k||^2 - 2 q.k, without the row's ||q||^2 (any sign)
        logits = scores.mul_(-c)
    else:
        logits = scores.clamp_min_(torch.finfo(scores.dtype).tiny).sqrt_().mul_(c).log1p_().mul_(-exponent)
    _add_masks_(logits, user, keep)
    peak = finite_or_zero(logits.amax(-1, keepdim=True))  # 0, not -inf, for a fully masked row
    weights = logits.sub_(peak).exp_()
    return peak, weights.sum(-1, keepdim=True)


def _kernel_grads_(scores, grad_weights, user, keep, lse, delta, exponent, c, gaussian: bool) -> torch.Tensor:
    """One backward tile, in place: squared distances (B, H, bq, Nk) become the weights ``P``,
    and ``dO v^T`` becomes ``g = dL/d sq = P (dO v^T - D) * d log Phi / d sq``.

    ``d log Phi / d sq`` is ``-c`` (Gaussian) or ``-(d_M + alpha) c / (2 r (1 + c r))`` with
    ``r = sqrt(sq)``; at zero distance (``sq`` below the smallest normal) the gradient is
    defined as 0, since ``sqrt`` has an infinite slope there. ``lse``, ``delta``: (B, H, bq).
    Returns the row sums of ``g``, (B, H, bq, 1).
    """
    lse, delta = lse.unsqueeze(-1), delta.unsqueeze(-1)
    if gaussian:  # as in _kernel_weights_
        logits = scores.mul(-c)
        slope = -c
    else:
        small = scores < torch.finfo(scores.dtype).tiny
        r = scores.clamp_min_(torch.finfo(scores.dtype).tiny).sqrt_()
        u = r * c + 1.0
        logits = torch.log(u).mul_(-exponent)
        # c / (r (1 + c r)) as 1 / (r (r + 1 / c)): no c r^2 to overflow for a small bandwidth.
        slope = torch.add(r, 1.0 / c, out=u).mul_(r).reciprocal_().mul_(-0.5 * exponent).masked_fill_(small, 0.0)
    _add_masks_(logits, user, keep)
    weights = logits.sub_(lse).exp_()
    grad_weights.sub_(delta).mul_(weights).mul_(slope)
    scores.copy_(weights)
    return grad_weights.sum(-1, keepdim=True)


def _kernel_constants(call: AttentionCall, head_dim: int) -> tuple[float, float]:
    """(exponent, c) of a Euclidean call with float alpha and bandwidth: ``log Phi`` is
    ``-exponent * log(1 + c sqrt(sq))`` (power law) or ``-c sq`` (Gaussian)."""
    return _euclidean_constants(call.alpha, call.bandwidth, call.rescale, call.d_intrinsic, call.length_unit, head_dim)


@functools.lru_cache(maxsize=256)
def _euclidean_constants(alpha, bandwidth, rescale, d_intrinsic, length_unit, head_dim) -> tuple[float, float]:
    """:func:`_kernel_constants`, remembered: a model calls with a few settings, many times."""
    call = AttentionCall(alpha, bandwidth, "euclidean", rescale, d_intrinsic, 1.0, 0.0, None, False, False, length_unit)
    kw = call.kernel_kwargs(head_dim)
    exponent = float(kw["d_intrinsic"] + kw["alpha"])
    if call.is_gaussian:
        return exponent, 1.0 / (kw["kappa"] ** 2 * kw["bandwidth"])
    return exponent, kw["bandwidth"] ** (-1.0 / kw["alpha"]) / kw["kappa"]


class _EuclideanFNA(torch.autograd.Function):
    """The hot path: Euclidean distances, float alpha and bandwidth, no density term.

    Same tiling as ``_TiledFNA`` with the chain rule written out. Squared distances come from
    one matmul, ``sq = q^ . k^`` with ``q^ = [-2q, ||q||^2, 1]`` and ``k^ = [k, 1, ||k||^2]``
    (the Gaussian leaves ``||q||^2`` out: :func:`kernels.gaussian_logits_shifted`);
    the elementwise work of a tile is :func:`_kernel_weights_` / :func:`_kernel_grads_`, in
    place on two tile-sized work buffers allocated once per call (fresh tile-sized allocations
    cost page faults on every tile). With ``g = dL/d sq``:
    ``dL/dq_i = 2 (q_i sum_j g_ij - sum_j g_ij k_j)`` and ``dL/dk_j = 2 (k_j sum_i g_ij - sum_i g_ij q_i)``;
    the row sums of ``g`` come out of the tile's elementwise pass and the column sums out of the
    matmul ``g^T q^``, since ``q^`` ends in [||q||^2, 1].
    """

    @staticmethod
    def forward(ctx, q, k, v, call, block):
        (batch, heads, nq, d), nk = q.shape, k.shape[-2]
        exponent, c = _kernel_constants(call, d)
        k_sq = (k * k).sum(-1, keepdim=True)
        # The Gaussian leaves the row constant ||q||^2 out: see kernels.gaussian_logits_shifted.
        q_sq = q.new_zeros(*q.shape[:-1], 1) if call.is_gaussian else (q * q).sum(-1, keepdim=True)
        q_aug = torch.cat([-2.0 * q, q_sq, torch.ones_like(q_sq)], dim=-1)
        k_aug = torch.cat([k, torch.ones_like(k_sq), k_sq], dim=-1)
        k_aug_t = k_aug.transpose(-1, -2)  # a view: as fast in the matmuls as a transposed copy
        work = q.new_empty(batch * heads * min(block, nq) * nk)
        out = q.new_empty(batch, heads, nq, v.shape[-1])
        lse = q.new_empty(batch, heads, nq)
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            kv, user, keep = _tile_keys_and_masks(call, start, stop, nq, nk, q)
            scores = work[: batch * heads * (stop - start) * kv].view(batch, heads, stop - start, kv)
            torch.matmul(q_aug[..., start:stop, :], k_aug_t[..., :kv], out=scores)
            peak, total = _kernel_weights_(scores, user, keep, exponent, c, call.is_gaussian)
            # A fully masked row has total 0 and weights 0: its output is 0 / tiny = 0.
            out[..., start:stop, :] = (scores @ v[..., :kv, :]).div_(total.clamp_min(torch.finfo(q.dtype).tiny))
            lse[..., start:stop] = (peak + total.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse, q_aug, k_aug_t)
        ctx.call, ctx.block, ctx.exponent, ctx.c = call, block, exponent, c
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_aug, k_aug_t = ctx.saved_tensors
        call, block = ctx.call, ctx.block
        (batch, heads, nq, d_aug), nk, dv = q_aug.shape, k.shape[-2], v.shape[-1]
        d, bh = d_aug - 2, batch * heads
        grad_out = grad_out.contiguous()
        lse = finite_or_zero(lse)
        delta = (grad_out * out).sum(-1)
        v_t = v.transpose(-1, -2).contiguous()
        work = q_aug.new_empty(2, bh * min(block, nq) * nk)
        grad_q = q_aug.new_empty(batch, heads, nq, d)
        grad_v = v.new_zeros(v.shape)  # contiguous, whatever the layout of v
        g_q_aug = k.new_zeros(batch, heads, nk, d_aug)  # sum over all tiles of g^T q^
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            rows = stop - start
            kv, user, keep = _tile_keys_and_masks(call, start, stop, nq, nk, q_aug)
            scores, grad_scores = (w[: bh * rows * kv].view(batch, heads, rows, kv) for w in work)
            q_tile, d_out = q_aug[..., start:stop, :], grad_out[..., start:stop, :]
            torch.matmul(q_tile, k_aug_t[..., :kv], out=scores)
            torch.matmul(d_out, v_t[..., :kv], out=grad_scores)
            g_row_sums = _kernel_grads_(
                scores,
                grad_scores,
                user,
                keep,
                lse[..., start:stop],
                delta[..., start:stop],
                ctx.exponent,
                ctx.c,
                call.is_gaussian,
            )  # scores now hold P, grad_scores g
            grad_v.view(bh, nk, dv)[:, :kv].baddbmm_(
                scores.view(bh, rows, kv).transpose(1, 2), d_out.reshape(bh, rows, dv)
            )
            # d sq / d q = 2 (q - k); the Gaussian's sq has no ||q||^2, and its d / d q is -2 k.
            q_part = 0.0 if call.is_gaussian else q[..., start:stop, :] * g_row_sums
            grad_q[..., start:stop, :] = (grad_scores @ k[..., :kv, :]).sub_(q_part).mul_(-2.0)
            g_q_aug.view(bh, nk, d_aug)[:, :kv].baddbmm_(
                grad_scores.view(bh, rows, kv).transpose(1, 2), q_tile.reshape(bh, rows, d_aug)
            )
        # g^T q^ = [-2 sum_i g_ij q_i, ., sum_i g_ij]
        grad_k = (k * g_q_aug[..., d + 1 :]).mul_(2.0).add_(g_q_aug[..., :d])
        return grad_q, grad_k, grad_v, None, None


def _is_hot_path(call: AttentionCall) -> bool:
    """Euclidean, float alpha and bandwidth, no density term: the chain rule written out (the
    fused CPU kernel, or :class:`_EuclideanFNA` when no mask is to be differentiated)."""
    floats = not isinstance(call.alpha, torch.Tensor) and not isinstance(call.bandwidth, torch.Tensor)
    return call.manifold == "euclidean" and floats and not call.density_a


def _mask_needs_grad(call: AttentionCall) -> bool:
    return call.attn_mask is not None and call.attn_mask.requires_grad and torch.is_grad_enabled()


def runs_fused_kernel(call: AttentionCall, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`attention` computes ``call`` on ``device`` in ``dtype`` with the fused CPU
    kernel: the hot path, and the kernel available there."""
    return _is_hot_path(call) and fused_cpu.applies(device, dtype)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, float, float]:
    """One query row (B, H, 1, d) against k, v through the fused CPU kernel, without autograd (the
    caller checked :func:`runs_fused_kernel`): the output and the largest magnitudes in q and k
    and in v, ``inf`` where an entry is not finite, taken as the kernel reads them."""
    return fused_cpu.decode(q, k, v, call, *_kernel_constants(call, q.shape[-1]))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttentionCall,
    block: int | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """FNA output (B, H, Nq, dv) with O(block * Nk) extra memory (``block`` given: always the
    tile loop, never the fused CPU kernel). ``fused``: :func:`runs_fused_kernel` of the call
    where the caller has it already (None: asked here)."""
    if fused is None:
        fused = runs_fused_kernel(call, q.device, q.dtype)
    if not block and fused:
        return fused_cpu.attention(q, k, v, call, *_kernel_constants(call, q.shape[-1]))
    q, k = call.prepare(q, k)
    if not block:
        block = block_size(q[..., 0, 0].numel(), q.shape[-2], k.shape[-2], q.shape[-1])
        block = min(block, CAUSAL_TILE_ROWS) if call.skips_causal_keys else block
    if _is_hot_path(call) and not _mask_needs_grad(call):
        return _EuclideanFNA.apply(q, k, v, call, block)
    alpha = call.alpha if isinstance(call.alpha, torch.Tensor) else None
    bandwidth = call.bandwidth if isinstance(call.bandwidth, torch.Tensor) else None
    mask = call.attn_mask if call.attn_mask is not None and call.attn_mask.is_floating_point() else None
    return _TiledFNA.apply(q, k, v, alpha, bandwidth, mask, call, block)
