"""Scale of the random-walk analyses: spectral gap and path lengths for H heads x N tokens.

Attention of a random-weight layer on Gaussian tokens (d_model 256, head dim 32): FNA
(alpha 1.2, the paper's defaults) and softmax (``softmax(q k^T / sqrt(d))``). Times each
analysis over all heads; prints a table and writes benchmarks/results/analysis_scale.json.

    .venv/bin/python benchmarks/analysis_scale.py [--n 2048] [--heads 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _record import write_record

from levyattn import fractional_attention
from levyattn.analysis import DENSE_MAX_N, path_lengths, spectral_gap


def weights(kind: str, n: int, heads: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    d_model, d_head = 256, 32
    x = torch.randn(1, n, d_model, generator=g)
    wq, wk = (torch.randn(d_model, heads * d_head, generator=g) / d_model**0.5 for _ in range(2))
    q = (x @ wq).view(1, n, heads, d_head).transpose(1, 2)
    k = (x @ wk).view(1, n, heads, d_head).transpose(1, 2)
    if kind == "softmax":
        return torch.softmax(q @ k.transpose(-1, -2) / d_head**0.5, -1)[0].double().numpy()
    _, w = fractional_attention(q, k, k, alpha=1.2, return_weights=True)
    return w[0].double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/analysis_scale.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for kind in ("fna", "softmax"):
        P = weights(kind, args.n, args.heads)
        row = {"attention": kind, "heads": args.heads, "n": args.n}
        t0 = time.perf_counter()
        gaps = spectral_gap(P)
        row["gap_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hops = path_lengths(P, kind="hops")
        row["hops_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        weighted = path_lengths(P, kind="weighted")
        row["weighted_s"] = time.perf_counter() - t0
        row["total_s"] = row["gap_s"] + row["hops_s"] + row["weighted_s"]
        row["mean_gap"] = float(np.mean(gaps))
        row["mean_hops"] = float(np.mean(hops.mean))
        row["mean_path_length"] = float(np.mean(weighted.mean))
        rows.append(row)
        print(
            f"{kind:8s} {args.heads} heads x N={args.n}: gap {row['gap_s']:.1f}s, hops {row['hops_s']:.1f}s, "
            f"weighted paths {row['weighted_s']:.1f}s, total {row['total_s']:.1f}s "
            f"(gap {row['mean_gap']:.4f}, hops {row['mean_hops']:.3f}, -log P path {row['mean_path_length']:.3f})",
            flush=True,
        )
    write_record(args.out, args, rows, eigensolver=f"ARPACK beyond {DENSE_MAX_N} tokens")


if __name__ == "__main__":
    main()
