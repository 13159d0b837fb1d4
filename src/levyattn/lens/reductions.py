"""From attention rows to per-head values of ``A(d)``.

Both reductions take one layer's weights at some query positions only: ``att`` (B, H, R, L),
row ``r`` being query ``rows[r]``'s distribution over the L keys (the whole matrix is the case
``rows = 0 .. L-1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def published_values(att: torch.Tensor, keys: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(B, H, R, L) -> (B, H, R) float64: the weight of row ``r`` on key ``keys[r]``."""
    r = torch.arange(att.shape[2], device=att.device)
    return att[:, :, r, torch.as_tensor(keys, device=att.device)].to(torch.float64)


def dense_values(
    att: torch.Tensor,
    rows: torch.Tensor,
    distances: Sequence[int],
    query_ok: torch.Tensor,
    key_ok: torch.Tensor,
    causal: bool,
    normalize: str,
    direction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head mean over the kept pairs at each distance (B, H, D) and the pair counts (B, D).

    att (B, H, R, L) at query positions ``rows`` (R,); query_ok / key_ok (B, L) say which
    positions may be a query / a key. ``direction`` "backward" pairs query i with key i - d,
    "forward" with i + d, "both" with either. ``normalize`` as :class:`DenseOptions` says.
    A distance with no kept pair is NaN.
    """
    b, h, _, n = att.shape
    rows = rows.to(att.device)
    if normalize == "renorm":
        mass = (att.to(torch.float64) * key_ok[:, None, None, :]).sum(-1)  # (B, H, R)
        factor = torch.where(mass > 0, 1.0 / mass.clamp(min=1e-300), torch.zeros(()))
    elif normalize == "relative":  # keys the query may attend to, per row
        allowed = key_ok.cumsum(-1) if causal else key_ok.sum(-1, keepdim=True).expand(b, n)
        factor = allowed[:, rows].to(torch.float64)[:, None, :].expand(b, h, rows.numel())
    else:
        factor = None
    sums = torch.zeros(b, h, len(distances), dtype=torch.float64, device=att.device)
    counts = torch.zeros(b, len(distances), dtype=torch.float64, device=att.device)
    sides = {"backward": (-1,), "forward": (1,), "both": (-1, 1)}[direction]
    for col, d in enumerate(distances):
        for side in sides:
            keys = rows + side * d
            (r_idx,) = torch.nonzero((keys >= 0) & (keys < n), as_tuple=True)
            vals = att[:, :, r_idx, keys[r_idx]].to(torch.float64)  # (B, H, R'): only the pairs read, in float64
            if factor is not None:
                vals = vals * factor[:, :, r_idx]
            ok = query_ok[:, rows[r_idx]] & key_ok[:, keys[r_idx]]  # (B, R')
            sums[:, :, col] += (vals * ok[:, None, :]).sum(-1)
            counts[:, col] += ok.sum(-1)
    means = sums / counts[:, None, :]  # NaN where no pair was kept
    return means, counts
