"""The arithmetic limit of FNA next to softmax SDPA: how much more work one shape needs.

A measured ratio (FNA time over SDPA time) means little without the ratio the arithmetic
allows. Both attentions do the same matrix products per (query, key) pair; FNA adds per-pair
elementwise work (a square root and a log1p beside softmax's exp). This module counts both and
weights each kind of operation by its measured cost on this machine, so that

    limit = cost(FNA) / cost(SDPA)

is what a kernel as good as SDPA's at every operation would reach.

Per pair, with head dims D (queries, keys) and Dv (values):

- Matrix products, in flops: forward ``2D`` (q.k) + ``2Dv`` (P v), the same for both (FNA's
  distance is ``|q|^2 + |k|^2 - 2 q.k`` with the norms computed once per row). Backward, with
  the logits recomputed as FlashAttention does: ``2D`` (q.k) + ``2Dv`` (dO v^T) + ``2Dv``
  (P^T dO) + ``2D`` (dS k) + ``2D`` (dS^T q).
- Elementwise, in the operations of :data:`ELEMENTWISE` (one ``exp`` each for softmax and FNA:
  FNA's weights are ``exp(log Phi - logsumexp)``; FNA's power law adds ``sqrt`` and a logarithm
  forward, and its backward the derivative through them, one ``div``; "flop" counts the
  multiplies, adds, clamps and compares). The logarithm is counted as ``log`` of ``1 + c r``, not
  ``log1p`` (2-3x dearer here): the fused kernel adds the rounding of ``1 + c r`` back with a few
  flops, which keeps ``log1p``'s accuracy.

The weights are seconds per element (elementwise) and per flop (matrix products), measured on
one thread by :func:`measure_costs`: ``torch.exp``/``log``/``log1p``/``sqrt``/``div`` with ``out=`` on
a float32 vector that stays in L2 (PyTorch's vectorised CPU functions, the same ``Vectorized``
code a fused kernel calls), and a (256 x D) @ (D x 256) product repeated (the tile size of a
fused kernel). An elementwise "flop" is one vector instruction per lane on data in registers,
counted as two matrix-product flops (a fused multiply-add does two per lane and instruction).
Causal masking halves both sides alike and leaves the ratio unchanged.
"""

from __future__ import annotations

import time
from functools import cache

import torch

# Per pair: (operation, count). "flop" is one add/multiply/compare (vectorised).
ELEMENTWISE = {
    ("sdpa", "fwd"): {"exp": 1, "flop": 4},  # scale, running max, subtract, accumulate
    ("sdpa", "bwd"): {"exp": 1, "flop": 6},  # recompute P; dS = P * (dP - Delta), scale
    ("power", "fwd"): {"exp": 1, "sqrt": 1, "log": 1, "flop": 8},  # sq, clamp, c*, -e*, lse
    ("power", "bwd"): {"exp": 1, "sqrt": 1, "log": 1, "div": 1, "flop": 12},  # + chain rule
    ("gauss", "fwd"): {"exp": 1, "flop": 6},  # sq, -c*, lse
    ("gauss", "bwd"): {"exp": 1, "flop": 8},
}


def _seconds(fn, repeats: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@cache
def measure_costs(head_dim: int = 64, n: int = 1 << 15) -> dict[str, float]:
    """Seconds per element of each elementwise operation and per flop of a tile matrix product,
    on one thread in float32 (best of 30)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.rand(n) + 0.5
        y = torch.empty(n)
        costs = {
            name: _seconds(lambda fn=fn: fn(x, out=y)) / n
            for name, fn in (("exp", torch.exp), ("log", torch.log), ("log1p", torch.log1p), ("sqrt", torch.sqrt))
        }
        costs["div"] = _seconds(lambda: torch.div(x, x, out=y)) / n
        a, b, c = torch.rand(256, head_dim), torch.rand(head_dim, 256), torch.empty(256, 256)
        reps = 20
        products = _seconds(lambda: [torch.mm(a, b, out=c) for _ in range(reps)])
        costs["matmul_flop"] = products / (reps * 2 * 256 * 256 * head_dim)
        costs["flop"] = 2 * costs["matmul_flop"]
    finally:
        torch.set_num_threads(threads)
    return costs


def pair_cost(kernel: str, mode: str, head_dim: int, value_dim: int | None = None, costs: dict | None = None) -> float:
    """Seconds per (query, key) pair on one thread of ``kernel`` ("sdpa", "power" for FNA at
    alpha < 2, "gauss" at alpha = 2) in ``mode`` ("fwd" or "fwd+bwd")."""
    d, dv = head_dim, value_dim or head_dim
    costs = costs or measure_costs(head_dim)
    parts = [("fwd", 2 * d + 2 * dv)] + ([("bwd", 6 * d + 4 * dv)] if mode == "fwd+bwd" else [])
    total = 0.0
    for part, matmul_flops in parts:
        total += matmul_flops * costs["matmul_flop"]
        total += sum(count * costs[op] for op, count in ELEMENTWISE[(kernel, part)].items())
    return total


def attention_limit(mode: str, head_dim: int, alpha: float = 1.2, value_dim: int | None = None) -> float:
    """The arithmetic limit of FNA over softmax SDPA for one shape: cost(FNA) / cost(SDPA)."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    kernel = "gauss" if alpha == 2 else "power"
    return pair_cost(kernel, mode, head_dim, value_dim) / pair_cost("sdpa", mode, head_dim, value_dim)


if __name__ == "__main__":
    print("| head dim | alpha | fwd limit | fwd+bwd limit |")
    print("|---:|---:|---:|---:|")
    for dim in (16, 32, 64, 128):
        for alpha in (1.2, 2.0):
            fwd, both = attention_limit("fwd", dim, alpha), attention_limit("fwd+bwd", dim, alpha)
            print(f"| {dim} | {alpha} | {fwd:.3f} | {both:.3f} |")
    print({k: f"{v * 1e9:.3f} ns" for k, v in measure_costs().items()})
