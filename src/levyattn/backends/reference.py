"""The reference backend: materialises the (Nq, Nk) weights in the log domain.

It is the ground truth every other backend is tested against, and the only one that
returns weights. Memory is O(B * H * Nq * Nk).
"""

from __future__ import annotations

import torch

from levyattn.backends.common import AttentionCall, finite_or_zero, safe_logsumexp, softmax_rows


def attention_weights(q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Row-stochastic FNA weights P: (B, H, Nq, d), (B, H, Nk, d) -> (B, H, Nq, Nk).

    Fully masked rows are 0.
    """
    q, k = call.prepare(q, k)
    logits = call.logits(q, k, 0, q.shape[-2])
    if call.density_a:
        # Row normalisation cancels R_i**-a; only the column sums C_j remain.
        log_col = finite_or_zero(safe_logsumexp(logits, -2))
        logits = logits - call.density_a * log_col.unsqueeze(-2)
    return softmax_rows(logits)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, return_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    weights = attention_weights(q, k, call)
    out = weights @ v
    return out, (weights if return_weights else None)
