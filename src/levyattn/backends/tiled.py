"""The tiled backend: memory linear in sequence length, on the CPU and the GPU.

Forward walks over blocks of queries: for each block it forms the masked ``log Phi``
against all keys, its row log-sum-exp and the output, and keeps only the outputs and
the (B, H, Nq) log-sum-exp. Backward walks the blocks again, recomputes each block's
weights from the saved log-sum-exp (as FlashAttention does) and pushes the gradient of
the logits back through the kernel with autograd, one block at a time. Peak extra
memory is O(block * Nk) instead of O(Nq * Nk).

Density normalisation (``density_a > 0``) needs the column sums ``C_j`` over all
queries: one extra pass computes them first, and backward adds their coupling term.
"""

from __future__ import annotations

import dataclasses

import torch

from levyattn.backends.common import AttentionCall, finite_or_zero, safe_logsumexp

# Elements of one (B, H, block, Nk) logits tile; 2**21 float32 values = 8 MiB. It bounds
# the extra memory; measured on 2 CPU cores (forward+backward, alpha 1.2), it was the
# fastest of 2**18..2**22 at (8, 4, 512, 16), (16, 4, 128, 16) and (1, 4, 4096, 64).
TILE_ELEMENTS = 1 << 21


# At least this many query rows per tile: thinner tiles make the matrix products inefficient
# (measured: at N = 16384, 32-row tiles were 1.3x slower than 64-row ones). Memory stays
# linear in Nk.
MIN_TILE_ROWS = 64


def block_size(batch_heads: int, nq: int, nk: int) -> int:
    """Query rows per tile: about TILE_ELEMENTS values per (B, H, block, Nk) tile, at least
    MIN_TILE_ROWS rows."""
    return min(nq, max(MIN_TILE_ROWS, TILE_ELEMENTS // max(1, batch_heads * nk)))


def _column_log_sums(q, k, call, block):
    """log C_j = log sum_i Phi_ij over all (unmasked) queries: (B, H, Nk)."""
    nq = q.shape[-2]
    total = None
    for start in range(0, nq, block):
        part = safe_logsumexp(call.logits(q[..., start : start + block, :], k, start, nq), -2)
        total = part if total is None else torch.logaddexp(total, part)
    return finite_or_zero(total)


class _TiledFNA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha, bandwidth, call, block):
        call = dataclasses.replace(
            call,
            alpha=call.alpha if alpha is None else alpha,
            bandwidth=call.bandwidth if bandwidth is None else bandwidth,
        )
        nq = q.shape[-2]
        col_bias = None
        log_col = None
        if call.density_a:
            log_col = _column_log_sums(q, k, call, block)
            col_bias = (-call.density_a * log_col).unsqueeze(-2)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1])
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            logits = call.logits(q[..., start:stop, :], k, start, nq)
            if col_bias is not None:
                logits = logits + col_bias
            row_lse = safe_logsumexp(logits, -1)
            lse[..., start:stop] = row_lse
            weights = torch.exp(logits - finite_or_zero(row_lse).unsqueeze(-1))
            out[..., start:stop, :] = weights @ v
        ctx.save_for_backward(q, k, v, out, lse, log_col, alpha, bandwidth)
        ctx.call = call
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, log_col, alpha, bandwidth = ctx.saved_tensors
        call, block = ctx.call, ctx.block
        nq = q.shape[-2]
        lse = finite_or_zero(lse)
        delta = (grad_out * out).sum(-1)  # D_i = sum_j P_ij dP_ij
        col_bias = None if log_col is None else (-call.density_a * log_col).unsqueeze(-2)

        def block_weights(logits, start, stop):
            if col_bias is not None:
                logits = logits + col_bias
            return torch.exp(logits - lse[..., start:stop].unsqueeze(-1))

        def block_grad_scores(weights, start, stop):
            grad_weights = grad_out[..., start:stop, :] @ v.transpose(-1, -2)
            return weights * (grad_weights - delta[..., start:stop].unsqueeze(-1))

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

        need_q, need_k, need_v, need_alpha, need_bw = ctx.needs_input_grad[:5]
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_v = torch.zeros_like(v) if need_v else None
        grad_alpha = torch.zeros_like(alpha) if need_alpha else None
        grad_bw = torch.zeros_like(bandwidth) if need_bw else None
        k_leaf = k.detach().requires_grad_(need_k)
        alpha_leaf = alpha.detach().requires_grad_(need_alpha) if alpha is not None else None
        bw_leaf = bandwidth.detach().requires_grad_(need_bw) if bandwidth is not None else None
        leaf_call = dataclasses.replace(
            call,
            alpha=call.alpha if alpha_leaf is None else alpha_leaf,
            bandwidth=call.bandwidth if bw_leaf is None else bw_leaf,
        )
        inputs_wanted = [need_q, need_k, need_alpha, need_bw]
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            q_leaf = q[..., start:stop, :].detach().requires_grad_(need_q)
            with torch.enable_grad():
                logits = leaf_call.logits(q_leaf, k_leaf, start, nq)
            raw = logits.detach()
            weights = block_weights(raw, start, stop)
            if need_v:
                grad_v += weights.transpose(-1, -2) @ grad_out[..., start:stop, :]
            grad_logits = block_grad_scores(weights, start, stop)
            if coupling is not None:
                grad_logits = grad_logits + torch.exp(raw - log_col.unsqueeze(-2)) * coupling
            leaves = [q_leaf, k_leaf, alpha_leaf, bw_leaf]
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
        return grad_q, grad_k, grad_v, grad_alpha, grad_bw, None, None


class _EuclideanFNA(torch.autograd.Function):
    """The hot path: Euclidean distances, float alpha and bandwidth, no density term.

    Same tiling as ``_TiledFNA`` with the chain rule written out, so each tile costs a
    few in-place passes instead of an autograd graph:
    ``sq = q^ . k^`` with ``q^ = [-2q, ||q||^2, 1]``, ``k^ = [k, 1, ||k||^2]`` (one matmul),
    ``log Phi = -(d_M + alpha) log1p(c sqrt(sq))`` with ``c = eps**(-1/alpha) / kappa``
    (alpha < 2) or ``-sq / (kappa^2 eps)`` (alpha = 2), and
    ``d loss / d q_i = 2 (q_i sum_j g_ij - sum_j g_ij k_j)`` with ``g = dS * dlogPhi/dsq``.
    """

    @staticmethod
    def _scores(q_aug, k_aug, call, start, nq, nk, exponent, c, for_backward=False):
        """Masked log Phi of one tile, and what backward needs of it: (logits, r * u or None, small)."""
        sq = q_aug @ k_aug.transpose(-1, -2)
        if call.is_gaussian:
            logits, ru, small = sq.clamp_min_(0).mul_(-c), None, None
        elif not for_backward:
            tiny = torch.finfo(sq.dtype).tiny
            logits, ru, small = sq.clamp_min_(tiny).sqrt_().mul_(c).log1p_().mul_(-exponent), None, None
        else:
            tiny = torch.finfo(sq.dtype).tiny
            small = sq < tiny
            r = sq.clamp_min_(tiny).sqrt_()
            u = r * c + 1.0
            ru = r.mul_(u)
            logits = u.log_().mul_(-exponent)
        mask = call.mask_rows(start, start + q_aug.shape[-2], nq, nk, q_aug.device)
        if mask is not None:
            if mask.dtype == torch.bool:
                logits.masked_fill_(~mask, float("-inf"))
            else:
                logits.add_(mask)
        return logits, ru, small

    @staticmethod
    def forward(ctx, q, k, v, call, block):
        nq, nk = q.shape[-2], k.shape[-2]
        kw = call.kernel_kwargs(q.shape[-1])
        exponent = kw["d_intrinsic"] + kw["alpha"]
        if call.is_gaussian:
            c = 1.0 / (kw["kappa"] ** 2 * kw["bandwidth"])
        else:
            c = kw["bandwidth"] ** (-1.0 / kw["alpha"]) / kw["kappa"]
        q_sq, k_sq = (q * q).sum(-1, keepdim=True), (k * k).sum(-1, keepdim=True)
        q_aug = torch.cat([-2.0 * q, q_sq, torch.ones_like(q_sq)], dim=-1)
        k_aug = torch.cat([k, torch.ones_like(k_sq), k_sq], dim=-1)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1])
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            logits, _, _ = _EuclideanFNA._scores(q_aug[..., start:stop, :], k_aug, call, start, nq, nk, exponent, c)
            row_lse = torch.logsumexp(logits, dim=-1)
            lse[..., start:stop] = row_lse
            weights = logits.sub_(finite_or_zero(row_lse).unsqueeze(-1)).exp_()
            torch.matmul(weights, v, out=out[..., start:stop, :])
        ctx.save_for_backward(q, k, v, out, lse, q_aug, k_aug)
        ctx.call, ctx.block, ctx.exponent, ctx.c = call, block, exponent, c
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_aug, k_aug = ctx.saved_tensors
        call, block, exponent, c = ctx.call, ctx.block, ctx.exponent, ctx.c
        nq, nk = q.shape[-2], k.shape[-2]
        lse = finite_or_zero(lse)
        delta = (grad_out * out).sum(-1)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # d log Phi / d sq: -c (Gaussian) or -(d_M + alpha) c / (2 r u) (power law).
        slope = -c if call.is_gaussian else -0.5 * exponent * c
        for start in range(0, nq, block):
            stop = min(nq, start + block)
            logits, ru, small = _EuclideanFNA._scores(
                q_aug[..., start:stop, :], k_aug, call, start, nq, nk, exponent, c, for_backward=True
            )
            weights = logits.sub_(lse[..., start:stop].unsqueeze(-1)).exp_()
            d_out = grad_out[..., start:stop, :]
            grad_v += weights.transpose(-1, -2) @ d_out
            grad_scores = (d_out @ v.transpose(-1, -2)).sub_(delta[..., start:stop].unsqueeze(-1)).mul_(weights)
            grad_sq = grad_scores.mul_(slope)
            if ru is not None:
                # sqrt was clamped below the smallest normal: zero distance, zero gradient.
                grad_sq.div_(ru).masked_fill_(small, 0.0)
            q_blk = q[..., start:stop, :]
            grad_q[..., start:stop, :] = 2.0 * (q_blk * grad_sq.sum(-1, keepdim=True) - grad_sq @ k)
            grad_k += 2.0 * (k * grad_sq.sum(-2).unsqueeze(-1) - grad_sq.transpose(-1, -2) @ q_blk)
        return grad_q, grad_k, grad_v, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttentionCall,
    block: int | None = None,
) -> torch.Tensor:
    """FNA output (B, H, Nq, dv) with O(block * Nk) extra memory."""
    q, k = call.prepare(q, k)
    batch_heads = q[..., 0, 0].numel()
    block = block or block_size(batch_heads, q.shape[-2], k.shape[-2])
    alpha = call.alpha if isinstance(call.alpha, torch.Tensor) else None
    bandwidth = call.bandwidth if isinstance(call.bandwidth, torch.Tensor) else None
    if call.manifold == "euclidean" and alpha is None and bandwidth is None and not call.density_a:
        return _EuclideanFNA.apply(q, k, v, call, block)
    return _TiledFNA.apply(q, k, v, alpha, bandwidth, call, block)
