"""Accuracy of the learnable alpha / bandwidth gradients in float32, against float64.

Per-head alpha and bandwidth tensors are differentiated by the ``reference`` backend (one
autograd graph) and by the ``tiled`` backend (its generic tile loop with a hand-written
backward) in float32; both are compared with ``reference`` in float64 on the same inputs, as
the relative error ``|g32 - g64| / |g64|`` of each gradient vector (H,). The loss is
``out.sum()``; the hard cases are values with a common offset, small bandwidths and the
density term, where the sums of the logit gradients (0 in exact arithmetic) meet a nearly
constant derivative of the logits with respect to alpha and bandwidth.

    python benchmarks/parameter_gradients.py
    python benchmarks/parameter_gradients.py --shape 2x4x512x64 --seeds 3 --bandwidths 1,1e-3 --densities 0

Prints a table and writes JSON (default benchmarks/results/parameter_gradients.json).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from _record import write_record

from levyattn import fractional_attention
from levyattn.io import markdown_table

BACKENDS = ("reference", "tiled")


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact).norm() / exact.norm())


def _gradients(q, k, v, alpha, bandwidth, manifold: str, density_a: float, backend: str, dtype: torch.dtype):
    """(d loss / d alpha, d loss / d bandwidth) with loss = out.sum(), computed in ``dtype``."""
    a = alpha.detach().to(dtype, copy=True).requires_grad_()
    bw = bandwidth.detach().to(dtype, copy=True).requires_grad_()
    out = fractional_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), alpha=a, bandwidth=bw, manifold=manifold, density_a=density_a,
        backend=backend,
    )  # fmt: skip
    out.sum().backward()
    return a.grad, bw.grad


def measure(shape, seeds: int, alpha: float, bandwidths: list[float], densities: list[float]) -> list[dict]:
    batch, heads, n, d = shape
    rows = []
    cases = itertools.product((0.0, 5.0), bandwidths, ("euclidean", "sphere"), densities)
    for value_offset, bandwidth, manifold, density_a in cases:
        errors = {f"{b} {p}": 0.0 for b in BACKENDS for p in ("alpha", "bandwidth")}
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
            v = v + value_offset
            alphas = torch.full((heads,), alpha, dtype=torch.float64)
            eps = torch.full((heads,), bandwidth, dtype=torch.float64)
            exact = _gradients(q, k, v, alphas, eps, manifold, density_a, "reference", torch.float64)
            for backend in BACKENDS:
                approx = _gradients(q, k, v, alphas, eps, manifold, density_a, backend, torch.float32)
                for name, g32, g64 in zip(("alpha", "bandwidth"), approx, exact):
                    key = f"{backend} {name}"
                    errors[key] = max(errors[key], _relative_error(g32, g64))
        case = dict(value_offset=value_offset, bandwidth=bandwidth, manifold=manifold, density_a=density_a)
        rows.append({**case, **errors})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2x4x128x32", help="BxHxNxD (default 2x4x128x32)")
    parser.add_argument("--seeds", type=int, default=3, help="inputs per case; the table shows the worst")
    parser.add_argument("--alpha", type=float, default=1.2)
    parser.add_argument("--bandwidths", default="1,0.1,1e-3,1e-12", help="comma-separated eps values")
    parser.add_argument("--densities", default="0,0.5", help="comma-separated density_a values")
    parser.add_argument("--out", default="benchmarks/results/parameter_gradients.json")
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"--shape must be BxHxNxD with positive integers, got {args.shape!r}")
    bandwidths, densities = ([float(x) for x in text.split(",")] for text in (args.bandwidths, args.densities))
    rows = measure(shape, args.seeds, args.alpha, bandwidths, densities)
    columns = [f"{b} {p}" for b in BACKENDS for p in ("alpha", "bandwidth")]
    print(f"float32 relative error of d(out.sum())/d(alpha, bandwidth) against float64, worst of {args.seeds} seeds")
    print(markdown_table(
        ["v offset", "eps", "manifold", "density_a", *columns],
        ([r["value_offset"], f"{r['bandwidth']:g}", r["manifold"], r["density_a"], *(f"{r[c]:.1e}" for c in columns)]
         for r in rows),
    ))  # fmt: skip
    write_record(args.out, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
