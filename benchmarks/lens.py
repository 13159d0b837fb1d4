"""Wall time to a gamma whose 95% CI half-width <= target, per procedure, on one model.

Procedures (all through ``levyattn.lens.measure_decay``):
- per-distance: the published procedure, one forward pass per distance per prompt, with the
  published tool's independent prompts per distance (``prompt_stream="published"``);
- one-pass: the exact causal shortcut, one pass of length max(d) + 50 per prompt;
- dense: every query-key pair at each distance (a different estimand: all queries, sink excluded).

Prompts are added in chunks (a new seed per chunk); after each chunk the percentile bootstrap
CI of gamma over all prompts so far is computed; the clock (measurement + bootstrap) stops at
the first chunk whose half-width is <= the target. The model is a random-weight Llama (RoPE)
built from a config (no downloads); ``--init`` (initializer_range, default 0.1) sets how peaked
and prompt-dependent its attention is. Writes benchmarks/results/lens.json.

    .venv/bin/python benchmarks/lens.py            # distances 10..500
    .venv/bin/python benchmarks/lens.py --full     # the published grid 10..2000
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from levyattn.io import atomic_write_json
from levyattn.lens import bootstrap_gamma, fit_power_law, measure_decay

warnings.filterwarnings("ignore")


def build_model(context: int, init: float) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=128, max_position_embeddings=context, vocab_size=50_000,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def time_to_ci(model, method: str, distances: list[int], target: float, chunk: int, max_prompts: int,
               n_boot: int) -> dict:
    kw: dict = {"distances": distances, "n_prompts": chunk, "causal": True, "batch_size": chunk}
    if method == "per-distance":
        kw.update(passes="per_distance", prompt_stream="published")
    elif method == "one-pass":
        kw.update(passes="one")
    else:
        kw.update(protocol="dense")
    rows: list[np.ndarray] = []
    passes = 0
    paired = True
    d = np.asarray(distances, dtype=float)
    t0 = time.perf_counter()
    half = float("inf")
    lo = hi = gamma = float("nan")
    k = 0
    while len(rows) * chunk < max_prompts:
        m = measure_decay(model, seeds=(1000 + k,), **kw)
        k += 1
        passes += m.n_passes
        paired = m.paired
        rows.append(m.flat_prompt_values())
        pv = np.concatenate(rows)
        gamma = fit_power_law(d, np.nanmean(pv, axis=0)).gamma
        if pv.shape[0] >= 2:
            lo, hi, _ = bootstrap_gamma(pv, d, n_boot=n_boot, paired=paired, seed=0)
            half = (hi - lo) / 2
        if half <= target:
            break
    wall = time.perf_counter() - t0
    return {"method": method, "prompts": int(len(rows) * chunk), "passes": passes, "wall_s": wall,
            "gamma": gamma, "ci": [lo, hi], "half_width": half, "reached": bool(half <= target), "paired": paired}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the published distances up to 2000")
    ap.add_argument("--target", type=float, default=0.05)
    ap.add_argument("--chunk", type=int, default=2)
    ap.add_argument("--max-prompts", type=int, default=100)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--init", type=float, default=0.1, help="initializer_range of the random-weight model")
    ap.add_argument("--out", default="benchmarks/results/lens.json")
    args = ap.parse_args()
    distances = [10, 20, 30, 50, 100, 200, 500, 1000, 2000] if args.full else [10, 20, 30, 50, 100, 200, 500]
    model = build_model(max(distances) + 100, args.init)
    results = [time_to_ci(model, m, distances, args.target, args.chunk, args.max_prompts, args.bootstrap)
               for m in ("per-distance", "one-pass", "dense")]
    base = results[0]["wall_s"]
    for r in results:
        r["speedup_vs_per_distance"] = base / r["wall_s"]
    header = "| procedure | prompts | passes | wall s | gamma | 95% CI | half-width | reached | speed-up |"
    lines = [header, "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['prompts']} | {r['passes']} | {r['wall_s']:.1f} | {r['gamma']:.4f} | "
                     f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {r['half_width']:.4f} | {r['reached']} | "
                     f"{r['speedup_vs_per_distance']:.1f}x |")
    print(f"model: random-weight Llama (2 layers, 4 heads, hidden 64, RoPE, init {args.init}), distances {distances}, "
          f"target half-width {args.target}, chunks of {args.chunk} prompts")
    print("\n".join(lines))
    atomic_write_json(Path(args.out), {
        "benchmark": "lens time to CI", "distances": distances, "target_half_width": args.target,
        "chunk": args.chunk, "bootstrap": args.bootstrap, "init": args.init, "torch": torch.__version__,
        "machine": platform.platform(), "threads": torch.get_num_threads(), "results": results,
        "markdown": "\n".join(lines),
    })


if __name__ == "__main__":
    main()
