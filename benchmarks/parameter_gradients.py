"""Accuracy of the learnable alpha / bandwidth gradients in float32, against float64.

Per-head alpha and bandwidth tensors are differentiated by the ``reference`` backend (one
autograd graph) and by the ``tiled`` backend (its generic tile loop with a hand-written
backward) in float32; both are compared with ``reference`` in float64 on the same inputs, as
the relative error ``|g32 - g64| / |g64|`` of each gradient vector (H,). The loss is
``out.sum()``; the hard cases are values with a common offset and the sphere with a small
bandwidth, where the row sums of the logit gradients (0 in exact arithmetic) meet a nearly
constant derivative of the logits with respect to alpha and bandwidth.

    python benchmarks/parameter_gradients.py
    python benchmarks/parameter_gradients.py --shape 2x4x512x64 --seeds 3

Prints a table and writes JSON (default benchmarks/results/parameter_gradients.json).
"""

from __future__ import annotations

import argparse
import itertools
import platform
from pathlib import Path

import torch

from levyattn import fractional_attention
from levyattn.io import atomic_write_json

BACKENDS = ("reference", "tiled")


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact).norm() / exact.norm())


def _gradients(q, k, v, alpha, bandwidth, manifold: str, backend: str, dtype: torch.dtype):
    """(d loss / d alpha, d loss / d bandwidth) with loss = out.sum(), computed in ``dtype``."""
    a = alpha.detach().to(dtype, copy=True).requires_grad_()
    bw = bandwidth.detach().to(dtype, copy=True).requires_grad_()
    out = fractional_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), alpha=a, bandwidth=bw, manifold=manifold, backend=backend
    )
    out.sum().backward()
    return a.grad, bw.grad


def measure(shape, seeds: int, alpha: float) -> list[dict]:
    batch, heads, n, d = shape
    rows = []
    for value_offset, bandwidth, manifold in itertools.product((0.0, 5.0), (1.0, 0.1), ("euclidean", "sphere")):
        errors = {f"{b} {p}": 0.0 for b in BACKENDS for p in ("alpha", "bandwidth")}
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
            v = v + value_offset
            alphas = torch.full((heads,), alpha, dtype=torch.float64)
            bandwidths = torch.full((heads,), bandwidth, dtype=torch.float64)
            exact = _gradients(q, k, v, alphas, bandwidths, manifold, "reference", torch.float64)
            for backend in BACKENDS:
                approx = _gradients(q, k, v, alphas, bandwidths, manifold, backend, torch.float32)
                for name, g32, g64 in zip(("alpha", "bandwidth"), approx, exact):
                    key = f"{backend} {name}"
                    errors[key] = max(errors[key], _relative_error(g32, g64))
        rows.append(dict(value_offset=value_offset, bandwidth=bandwidth, manifold=manifold, **errors))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2x4x128x32", help="BxHxNxD (default 2x4x128x32)")
    parser.add_argument("--seeds", type=int, default=3, help="inputs per case; the table shows the worst")
    parser.add_argument("--alpha", type=float, default=1.2)
    parser.add_argument("--out", default="benchmarks/results/parameter_gradients.json")
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"--shape must be BxHxNxD with positive integers, got {args.shape!r}")
    rows = measure(shape, args.seeds, args.alpha)
    columns = [f"{b} {p}" for b in BACKENDS for p in ("alpha", "bandwidth")]
    print(f"float32 relative error of d(out.sum())/d(alpha, bandwidth) against float64, worst of {args.seeds} seeds")
    print(f"{'v offset':>8} {'eps':>5} {'manifold':>9} " + " ".join(f"{c:>18}" for c in columns))
    for row in rows:
        cells = " ".join(f"{row[c]:>18.1e}" for c in columns)
        print(f"{row['value_offset']:>8} {row['bandwidth']:>5} {row['manifold']:>9} {cells}")
    meta = dict(
        shape=list(shape), seeds=args.seeds, alpha=args.alpha, torch=torch.__version__, cpu=platform.processor()
    )
    atomic_write_json(Path(args.out), dict(meta=meta, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
