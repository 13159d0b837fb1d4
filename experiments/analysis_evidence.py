"""Evidence for the paper's mechanistic claims (docs/analysis.md), measured (nothing here is asserted).

Part A -- FNA kernel matrices on manifolds: N points sampled uniformly from the sphere S^m
(in R^(m+1)) and the flat torus T^m (product of unit circles, in R^(2m)), intrinsic
dimension m = 1..8. Kernel ``Phi_alpha`` from ``levyattn.kernels.log_kernel`` with
``d_intrinsic = m``, ``rescale=False``, the self-pair excluded (as with a shared query/key
projection) and **matched bandwidth**: the length scale ``eps**(1/alpha)`` is the same for
every alpha (the median distance to the 10th nearest neighbour), so ``eps = scale**alpha``.
Rows normalised in the log domain. Reported per alpha in {1.0, 1.2, 1.5, 2.0}: spectral gap,
mixing steps (median), mean shortest path (-log P and hops), means over seeds.

Part B -- random-weight attention layers on the same inputs: tokens are points of the
same manifolds mapped to d_model = 64 by a random orthogonal map (B = 1, N tokens);
random projections W_q, W_k ~ N(0, gain^2 / d_model), 4 heads of dim 16; FNA via
``fractional_attention(..., return_weights=True)`` (rescale on, as in the paper) for each
alpha, softmax via ``softmax(q k^T / sqrt(d))``. Two weight scales (gain 1 and 4).

    .venv/bin/python experiments/analysis_evidence.py [--n 256] [--seeds 3] [--dims 1,2,3,4,6,8]

Prints tables, writes experiments/results/analysis_evidence.json and
experiments/figures/analysis_evidence_{gap,paths}.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from levyattn import fractional_attention
from levyattn.analysis import mixing_time, path_lengths, spectral_gap
from levyattn.analysis.plots import plot_lines
from levyattn.io import atomic_write_json, markdown_table
from levyattn.kernels import log_kernel

ALPHAS = (1.0, 1.2, 1.5, 2.0)


def sample(manifold: str, m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if manifold == "sphere":
        x = rng.normal(size=(n, m + 1))
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    angles = rng.uniform(0, 2 * np.pi, size=(n, m))
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1)


def kernel_matrix(X: np.ndarray, alpha: float, scale: float, m: int) -> np.ndarray:
    x = torch.from_numpy(X)
    logk = log_kernel(x, x, alpha=alpha, bandwidth=scale**alpha, rescale=False, d_intrinsic=float(m))
    logk.fill_diagonal_(-torch.inf)
    return torch.softmax(logk, -1).numpy()


def metrics(P: np.ndarray) -> dict[str, float]:
    return {
        "gap": float(np.mean(spectral_gap(P))),
        "mixing": float(np.mean(mixing_time(P))),
        "path": float(np.mean(path_lengths(P).mean)),
        "hops": float(np.mean(path_lengths(P, kind="hops").mean)),
    }


def mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    # Mixing steps can be inf (no mixing within 10000 steps): summarised by the median.
    return {k: float((np.median if k == "mixing" else np.mean)([d[k] for d in ds])) for k in ds[0]}


def part_a(n: int, seeds: int, dims: list[int]) -> list[dict]:
    rows = []
    for manifold in ("sphere", "torus"):
        for m in dims:
            per_alpha: dict[float, list] = {a: [] for a in ALPHAS}
            for seed in range(seeds):
                X = sample(manifold, m, n, np.random.default_rng(seed))
                dist = np.sqrt(np.maximum(((X[:, None] - X[None]) ** 2).sum(-1), 0))
                scale = float(np.median(np.sort(dist, axis=1)[:, 10]))
                for a in ALPHAS:
                    per_alpha[a].append(metrics(kernel_matrix(X, a, scale, m)))
            for a in ALPHAS:
                rows.append({"manifold": manifold, "dim": m, "alpha": a, **mean_dicts(per_alpha[a])})
            print(f"  {manifold} m={m}: " + ", ".join(
                f"a={a}: gap {r['gap']:.3f} path {r['path']:.2f}" for a in ALPHAS
                for r in [rows[-len(ALPHAS) + ALPHAS.index(a)]]), flush=True)
    return rows


def part_b(n: int, seeds: int, dims: list[int]) -> list[dict]:
    rows = []
    d_model, heads, d_head = 64, 4, 16
    for gain in (1.0, 4.0):
        results: dict[str, list] = {f"fna {a}": [] for a in ALPHAS} | {"softmax": []}
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            for manifold in ("sphere", "torus"):
                for m in dims:
                    X = torch.from_numpy(sample(manifold, m, n, np.random.default_rng(100 + seed))).float()
                    Q, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))
                    x = (X @ Q[: X.shape[1]]) * d_model**0.5 / X.shape[1] ** 0.5  # unit-variance features
                    wq = torch.randn(d_model, d_model, generator=g) * gain / d_model**0.5
                    wk = torch.randn(d_model, d_model, generator=g) * gain / d_model**0.5
                    q = (x @ wq).view(1, n, heads, d_head).transpose(1, 2)
                    k = (x @ wk).view(1, n, heads, d_head).transpose(1, 2)
                    soft = torch.softmax(q @ k.transpose(-1, -2) / d_head**0.5, -1)
                    results["softmax"].append(metrics(soft[0].double().numpy()))
                    for a in ALPHAS:
                        _, w = fractional_attention(q, k, k, alpha=a, return_weights=True)
                        results[f"fna {a}"].append(metrics(w[0].double().numpy()))
        for name, ds in results.items():
            rows.append({"gain": gain, "attention": name, **mean_dicts(ds)})
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    return markdown_table(keys, ([f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in keys] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dims", default="1,2,3,4,6,8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dims = [int(d) for d in args.dims.split(",")]
    t0 = time.perf_counter()
    print("Part A: FNA kernel matrices on spheres and tori")
    a_rows = part_a(args.n, args.seeds, dims)
    print(table(a_rows, ["manifold", "dim", "alpha", "gap", "mixing", "path", "hops"]))
    print("Part B: random-weight attention layers, same inputs (means over manifolds, dims, seeds, heads)")
    b_rows = part_b(args.n, args.seeds, dims)
    print(table(b_rows, ["gain", "attention", "gap", "mixing", "path", "hops"]))
    figures = Path("experiments/figures")
    for metric, label in (("gap", "spectral gap 1 - |λ2|"), ("path", "mean shortest path (-log P)")):
        series = {}
        for manifold in ("sphere", "torus"):
            for a in ALPHAS:
                series[f"{manifold} α={a}"] = [
                    r[metric] for r in a_rows if r["manifold"] == manifold and r["alpha"] == a
                ]
        plot_lines(dims, series, figures / f"analysis_evidence_{metric}.png", "intrinsic dimension m", label,
                   title=f"FNA kernel on S^m and T^m, N={args.n}, matched bandwidth")
    out = Path("experiments/results/analysis_evidence.json")
    atomic_write_json(out, {"n": args.n, "seeds": args.seeds, "dims": dims, "alphas": list(ALPHAS),
                            "kernel_matrices": a_rows, "random_layers": b_rows,
                            "seconds": time.perf_counter() - t0})
    print(f"wrote {out} and experiments/figures/analysis_evidence_{{gap,paths}}.png "
          f"in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
