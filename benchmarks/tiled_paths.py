"""The tiled backend's two CPU paths against each other and against softmax SDPA.

On the CPU in float32 and float64 the ``tiled`` backend runs a Euclidean call (float alpha and
bandwidth, no density term) through its fused C++ kernel (``levyattn.backends.fused_cpu``), and
through the tile loop where the kernel is switched off (``LEVYATTN_COMPILE=0``) or could not be
built. This script times both on the same inputs, with softmax ``scaled_dot_product_attention``
beside them. The paths are called interleaved, round by round, in one process, so that
background load hits them alike; each reports its median. At ``--alpha 2`` the ``sdpa`` backend
(the same Gaussian kernel through ``scaled_dot_product_attention`` with one extra dimension) is
timed beside them, and softmax SDPA with that extra dimension too (head dim D + 1: the floor of
the ``sdpa`` backend).

    python benchmarks/tiled_paths.py                          # the default shapes, fwd+bwd
    python benchmarks/tiled_paths.py --mode fwd               # without gradients
    python benchmarks/tiled_paths.py --shapes 16x4x128x16,1x4x4096x64 --causal
    python benchmarks/tiled_paths.py --alpha 2 --shapes 1x4x1024x64,1x4x4096x64

"limit" is the arithmetic limit of that shape (``_limits.attention_limit``: FNA's operations over
SDPA's, each weighted by its measured cost on this machine): the kernel / SDPA ratio that a kernel
as good as SDPA's at every operation would reach.

Shapes are BxHxNxD (self-attention, N queries and keys). Prints a table and writes JSON
(default benchmarks/results/tiled_paths.json).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from _limits import attention_limit
from _record import write_record

from levyattn import fractional_attention

DEFAULT_SHAPES = (
    "32x1x5x32,128x4x17x16,32x4x64x16,16x4x128x16,1x4x512x64,32x8x92x32,16x4x256x16,8x4x512x16,"
    "32x8x256x16,32x16x512x4,1x4x1024x64,1x4x4096x64"
)
PATHS = ("fused kernel", "tile loop", "sdpa softmax")


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shapes: each shape is BxHxNxD with positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def _run_path(path: str, q, k, v, args) -> float:
    """One call (forward, or forward+backward) through ``path``; returns its seconds. The
    environment is restored afterwards."""
    with mock.patch.dict(os.environ):
        if path == "tile loop":
            os.environ["LEVYATTN_COMPILE"] = "0"
        else:
            os.environ.pop("LEVYATTN_COMPILE", None)
        start = time.perf_counter()
        with torch.set_grad_enabled(args.mode == "fwd+bwd"):
            if path == "sdpa softmax":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
            elif path == "sdpa softmax D+1":
                q1, k1, v1 = (F.pad(x, (0, 1)) for x in (q, k, v))
                out = F.scaled_dot_product_attention(q1, k1, v1, is_causal=args.causal)
            else:
                backend = "sdpa" if path == "sdpa backend" else "tiled"
                out = fractional_attention(q, k, v, alpha=args.alpha, is_causal=args.causal, backend=backend)
            if args.mode == "fwd+bwd":
                out.sum().backward()
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxHxNxD")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--alpha", type=float, default=1.2)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default: by size, 11-100)")
    p.add_argument("--out", default="benchmarks/results/tiled_paths.json")
    args = p.parse_args()
    if not 0 < args.alpha <= 2:
        raise ValueError(f"--alpha must be in (0, 2], got {args.alpha}")
    shapes = [_parse_shape(s) for s in args.shapes.split(",")]
    paths = PATHS + (("sdpa backend", "sdpa softmax D+1") if args.alpha == 2 else ())
    rows = []
    print(f"{args.mode}, alpha {args.alpha}, causal {args.causal}, {torch.get_num_threads()} threads; median ms")
    gaussian = ["sdpa backend / SDPA", "SDPA D+1 / SDPA"] if args.alpha == 2 else []
    ratios = ["kernel / tile loop", "kernel / SDPA", "limit", *gaussian]
    print("| B x H x N x D | pairs | " + " | ".join(paths + tuple(ratios)) + " |")
    print("|---|---:|" + "---:|" * (len(paths) + len(ratios)))
    for batch, heads, n, dim in shapes:
        g = torch.Generator().manual_seed(0)
        grad = args.mode == "fwd+bwd"
        q, k, v = (torch.randn(batch, heads, n, dim, generator=g).requires_grad_(grad) for _ in range(3))
        for path in paths:  # warm-up: loading the kernel, allocator
            for _ in range(3):
                _run_path(path, q, k, v, args)
        pairs = batch * heads * n * n
        rounds = args.rounds or max(11, min(100, 30_000_000 // pairs))
        times = {path: [] for path in paths}
        for _ in range(rounds):
            for path in paths:
                times[path].append(_run_path(path, q, k, v, args))
        med = {path: statistics.median(ts) for path, ts in times.items()}
        over_loop = med["fused kernel"] / med["tile loop"]
        over_sdpa = med["fused kernel"] / med["sdpa softmax"]
        limit = attention_limit(args.mode, dim, args.alpha)
        cells = [over_loop, over_sdpa, limit]
        if args.alpha == 2:
            cells += [med["sdpa backend"] / med["sdpa softmax"], med["sdpa softmax D+1"] / med["sdpa softmax"]]
        rows.append(
            {
                "shape": [batch, heads, n, dim],
                "pairs": pairs,
                "rounds": rounds,
                "median_s": med,
                "kernel_over_tile_loop": over_loop,
                "kernel_over_sdpa": over_sdpa,
                "limit": limit,
                **dict(zip(("sdpa_backend_over_sdpa", "sdpa_d_plus_1_over_sdpa"), cells[3:])),
            }
        )
        times_ms = " | ".join(f"{1000 * med[path]:.2f}" for path in paths)
        shape = f"{batch}x{heads}x{n}x{dim}"
        ratio_cells = " | ".join(f"{r:.2f}x" for r in cells)
        print(f"| {shape} | 2**{math.log2(pairs):.1f} | {times_ms} | {ratio_cells} |", flush=True)
    write_record(args.out, args, rows)


if __name__ == "__main__":
    main()
