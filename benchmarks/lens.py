"""Wall time to a gamma whose 95% CI half-width <= target, per procedure, on one model.

Rows (one random-weight model for all; in each repeat every procedure draws its prompts from
the same seeds):

- ``published tool``: the published diagnostic's per-distance procedure run the way that tool
  runs it (re-implemented here, :func:`published_tool`): for each distance a fresh
  ``random.Random(seed)``; one prompt per forward pass (batch 1) through the whole causal LM
  (task head and logits included, the model's default ``use_cache``), eager attention, under
  ``torch.no_grad``; per prompt the weight of the last query on the key ``d`` before it, mean
  over heads, then layers. The tool itself reports no interval: its per-prompt values get the
  same bootstrap as every other row.
- ``per-distance``: the same procedure inside levyattn (``measure_decay(passes="per_distance",
  prompt_stream="published")``): the same token ids, the same values (checked), run through
  the model's backbone only and batched.
- ``one-pass``: the exact causal shortcut (one pass of length max(d) + 50 per prompt, nested
  prompts), same estimand.
- ``dense``: every query-key pair at each distance; a different estimand (all queries, sink
  excluded), listed for its cost only.

Prompts are added in chunks (a new seed per chunk); after each chunk the percentile bootstrap
CI of gamma over all prompts so far is computed; the clock (measurement + bootstrap) stops at
the first chunk whose half-width is <= the target, no interval being computed on fewer than
``--min-prompts`` prompts (8). Each levyattn procedure runs with its own fastest batch size
(1, 2, 4, ... up to the chunk, timed before the runs). The whole race is
repeated ``--repeats`` times with different seeds; the table gives medians (and ranges), the
wall time per prompt over all repeats, and speed-ups as ratios of median wall times.

The CI study then asks whether nested prompts (one prompt read at every distance: one-pass,
or per-distance with ``prompt_stream="nested"``, identical values) narrow the bootstrap CI
against the published stream (per distance its own prompts): at fixed numbers of prompts,
over ``--ci-repeats`` seeds, the mean half-width, the spread of gamma across seeds and the
coverage of a reference gamma (one-pass on ``--ref-prompts`` prompts).

The model is a random-weight Llama (RoPE) built from a config (no downloads); ``--init``
(initializer_range, default 0.1) sets how peaked and prompt-dependent its attention is.
Writes benchmarks/results/lens.json.

    .venv/bin/python benchmarks/lens.py            # distances 10..500
    .venv/bin/python benchmarks/lens.py --full     # the published grid 10..2000
"""

from __future__ import annotations

import argparse
import platform
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from levyattn.io import atomic_write_json
from levyattn.lens import bootstrap_gamma, fit_power_law, measure_decay
from levyattn.lens.prompts import PREFIX

warnings.filterwarnings("ignore")

#: (seed, n) -> ((n, D) per-prompt A(d), forward passes, paired): one chunk of prompts.
Procedure = Callable[[int, int], tuple[np.ndarray, int, bool]]


def build_model(context: int, init: float) -> torch.nn.Module:
    """A random-weight Llama causal LM (2 layers, 4 heads, 2 KV heads, hidden 64) in eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=context,
        vocab_size=50_000,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        initializer_range=init,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")  # as the published tool loads it; the lens would switch anyway
    return model


def published_tool(model: torch.nn.Module, distances: Sequence[int], low: int, high: int) -> Procedure:
    """The published per-distance procedure as the published tool runs it (see the module docstring).

    Returns a :data:`Procedure`; its table (n, D) holds each prompt's mean over heads (of the
    finite weights, in float32) then layers, for prompts ``random.Random(seed)`` draws afresh
    at every distance with ``randint(low, high)`` per token.
    """

    def run(seed: int, n: int) -> tuple[np.ndarray, int, bool]:
        table = np.empty((n, len(distances)))
        with torch.no_grad():
            for col, d in enumerate(distances):
                rng = random.Random(seed)
                length = d + PREFIX
                for p in range(n):
                    ids = torch.tensor([[rng.randint(low, high) for _ in range(length)]], dtype=torch.long)
                    out = model(ids, output_attentions=True, return_dict=True)
                    per_layer = []
                    for att in out.attentions:
                        w = att[0, :, length - 1, length - 1 - d].float().numpy()
                        per_layer.append(float(w[np.isfinite(w)].mean()))
                    table[p, col] = float(np.mean(per_layer))
        return table, n * len(distances), False

    return run


def in_library(model: torch.nn.Module, distances: Sequence[int], method: str, batch_size: int) -> Procedure:
    """``measure_decay`` as ``method`` ("per-distance", "one-pass" or "dense") in chunks of prompts."""
    kw: dict = {"distances": list(distances), "causal": True, "batch_size": batch_size}
    if method == "per-distance":
        kw.update(passes="per_distance", prompt_stream="published")
    elif method == "per-distance nested":
        kw.update(passes="per_distance", prompt_stream="nested")
    elif method == "one-pass":
        kw.update(passes="one")
    elif method == "dense":
        kw.update(protocol="dense")
    else:
        raise ValueError(f"method must be 'per-distance', 'per-distance nested', 'one-pass' or 'dense', got {method!r}")

    def run(seed: int, n: int) -> tuple[np.ndarray, int, bool]:
        m = measure_decay(model, seeds=(seed,), n_prompts=n, **kw)
        return m.flat_prompt_values(), m.n_passes, m.paired

    return run


def time_to_ci(
    proc: Procedure,
    distances: Sequence[int],
    target: float,
    chunk: int,
    min_prompts: int,
    max_prompts: int,
    n_boot: int,
    seed_base: int,
) -> dict:
    """Add chunks of prompts (seeds ``seed_base``, ``seed_base + 1``...) until the CI half-width <= target.

    No interval is computed before ``min_prompts`` prompts: a bootstrap over a handful of prompts
    has too few distinct resamples to be trusted, and one lucky narrow interval would end the
    race. The clock covers measurement and bootstrap. ``reached`` is False when ``max_prompts``
    came first.
    """
    d = np.asarray(distances, dtype=float)
    rows: list[np.ndarray] = []
    passes = 0
    paired = True
    half = float("inf")
    lo = hi = float("nan")
    t0 = time.perf_counter()
    while sum(len(r) for r in rows) < max_prompts:
        table, n_pass, paired = proc(seed_base + len(rows), chunk)
        passes += n_pass
        rows.append(table)
        pv = np.concatenate(rows)
        if pv.shape[0] >= max(2, min_prompts):
            boot = bootstrap_gamma(pv, d, n_boot=n_boot, paired=paired, seed=0)
            lo, hi = boot.lo, boot.hi
            half = (hi - lo) / 2
        if half <= target:
            break
    wall = time.perf_counter() - t0
    pv = np.concatenate(rows)
    gamma = fit_power_law(d, np.nanmean(pv, axis=0)).gamma
    return {
        "prompts": int(pv.shape[0]),
        "passes": passes,
        "wall_s": wall,
        "gamma": gamma,
        "ci": [lo, hi],
        "half_width": half,
        "reached": bool(half <= target),
        "paired": paired,
    }


def fastest_batch(
    make: Callable[[int], Procedure], chunk: int, n: int, rounds: int = 3
) -> tuple[int, dict[int, float]]:
    """The batch size (powers of two up to ``chunk``) with the least wall time per prompt on ``n`` prompts.

    Each size is timed ``rounds`` times after a warm-up and keeps its best round: a shared
    machine only ever adds time.
    """
    times: dict[int, float] = {}
    b = 1
    while b <= chunk:
        proc = make(b)
        proc(1, b)  # warm-up
        best = float("inf")
        for r in range(rounds):
            t0 = time.perf_counter()
            proc(2 + r, n)
            best = min(best, time.perf_counter() - t0)
        times[b] = best / n
        b *= 2
    return min(times, key=times.__getitem__), times


def ci_study(
    procs: dict[str, Procedure],
    distances: Sequence[int],
    n_prompts: Sequence[int],
    repeats: int,
    ref_gamma: float,
    n_boot: int,
) -> list[dict]:
    """Per procedure and number of prompts: bootstrap half-width, spread of gamma and coverage over seeds."""
    d = np.asarray(distances, dtype=float)
    rows = []
    for name, proc in procs.items():
        for n in n_prompts:
            half, gam, cover = [], [], []
            for r in range(repeats):
                table, _, paired = proc(50_000 + 1000 * n + r, n)
                gam.append(fit_power_law(d, table.mean(axis=0)).gamma)
                boot = bootstrap_gamma(table, d, n_boot=n_boot, paired=paired, seed=0)
                lo, hi = boot.lo, boot.hi
                half.append((hi - lo) / 2)
                cover.append(lo <= ref_gamma <= hi)
            sd = float(np.std(gam, ddof=1))
            rows.append(
                {
                    "procedure": name,
                    "prompts": n,
                    "repeats": repeats,
                    "paired": paired,
                    "half_width_mean": float(np.mean(half)),
                    "half_width_sd": float(np.std(half, ddof=1)),
                    "gamma_mean": float(np.mean(gam)),
                    "gamma_sd": sd,
                    "calibrated_half_width": 1.96 * sd,
                    "coverage": float(np.mean(cover)),
                }
            )
    return rows


def forward_times(model: torch.nn.Module, length: int, low: int, high: int, repeats: int = 5) -> dict:
    """Best wall time of one forward (batch 1, eager, weights returned) of the whole LM and of its backbone.

    The prompt has ``length`` token ids drawn from ``[low, high]``.
    """
    ids = torch.randint(low, high + 1, (1, length))
    out = {}
    with torch.no_grad():
        for name, module, kw in (
            ("whole_lm", model, {"return_dict": True}),
            ("backbone", model.base_model, {"use_cache": False}),
        ):
            module(ids, output_attentions=True, **kw)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                module(ids, output_attentions=True, **kw)
                best = min(best, time.perf_counter() - t0)
            out[name] = best
    return out


def _median_range(values: Sequence[float], fmt: str) -> str:
    v = np.asarray(values, dtype=float)
    return f"{np.median(v):{fmt}} ({v.min():{fmt}}-{v.max():{fmt}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the published distances up to 2000")
    ap.add_argument("--target", type=float, default=0.05)
    ap.add_argument("--chunk", type=int, default=2)
    ap.add_argument("--min-prompts", type=int, default=8, help="no interval is computed on fewer prompts")
    ap.add_argument("--max-prompts", type=int, default=100)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=10, help="races with different seeds (medians reported)")
    ap.add_argument("--ci-prompts", default="8,16,32", help="prompt counts of the CI study ('' skips it)")
    ap.add_argument("--ci-repeats", type=int, default=40)
    ap.add_argument("--ref-prompts", type=int, default=2000, help="one-pass prompts for the reference gamma")
    ap.add_argument("--init", type=float, default=0.1, help="initializer_range of the random-weight model")
    ap.add_argument("--out", default="benchmarks/results/lens.json")
    args = ap.parse_args()
    distances = [10, 20, 30, 50, 100, 200, 500, 1000, 2000] if args.full else [10, 20, 30, 50, 100, 200, 500]
    model = build_model(max(distances) + 100, args.init)
    low, high = 1000, min(model.config.vocab_size - 1, 49_000)  # the published token range

    batches, sweep = {}, {}
    for method in ("per-distance", "one-pass", "dense"):
        batches[method], sweep[method] = fastest_batch(
            lambda b, m=method: in_library(model, distances, m, b), args.chunk, 4 * args.chunk
        )
    procs: dict[str, Procedure] = {"published tool": published_tool(model, distances, low, high)}
    procs.update({m: in_library(model, distances, m, batches[m]) for m in ("per-distance", "one-pass", "dense")})

    # the published tool and levyattn's per-distance procedure read the same tokens: same values
    ref_tab = procs["published tool"](1000, args.chunk)[0]
    lib_tab = procs["per-distance"](1000, args.chunk)[0]
    same_values = float(np.max(np.abs(ref_tab - lib_tab) / np.abs(lib_tab)))
    if same_values > 1e-5:
        raise SystemExit(f"published tool and per-distance disagree: max relative difference {same_values:.2e}")

    runs: dict[str, list[dict]] = {name: [] for name in procs}
    for rep in range(args.repeats):
        for name, proc in procs.items():
            runs[name].append(
                time_to_ci(
                    proc,
                    distances,
                    args.target,
                    args.chunk,
                    args.min_prompts,
                    args.max_prompts,
                    args.bootstrap,
                    seed_base=1000 * (rep + 1),
                )
            )
    med = {name: float(np.median([r["wall_s"] for r in rs])) for name, rs in runs.items()}
    summary = []
    header = (
        "| procedure | batch | prompts | forward passes | wall s | ms per prompt | gamma | half-width | reached | "
        "speed-up vs per-distance | speed-up vs published tool |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        row = {
            "procedure": name,
            "batch": batches.get(name, 1),
            "runs": rs,
            "median_wall_s": med[name],
            "ms_per_prompt": 1e3 * sum(r["wall_s"] for r in rs) / sum(r["prompts"] for r in rs),
            "speedup_vs_per_distance": med["per-distance"] / med[name],
            "speedup_vs_published_tool": med["published tool"] / med[name],
        }
        summary.append(row)
        cells = [
            name,
            str(row["batch"]),
            _median_range([r["prompts"] for r in rs], ".0f"),
            f"{np.median([r['passes'] for r in rs]):.0f}",
            _median_range([r["wall_s"] for r in rs], ".2f"),
            f"{row['ms_per_prompt']:.1f}",
            f"{np.median([r['gamma'] for r in rs]):.4f}",
            f"{np.median([r['half_width'] for r in rs]):.4f}",
            f"{sum(r['reached'] for r in rs)}/{len(rs)}",
            f"{row['speedup_vs_per_distance']:.1f}x",
            f"{row['speedup_vs_published_tool']:.1f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    fwd = forward_times(model, max(distances) + PREFIX, low, high)
    print(
        f"model: random-weight Llama (2 layers, 4 heads, hidden 64, vocabulary 50000, RoPE, init {args.init}), "
        f"distances {distances}, target half-width {args.target}, chunks of {args.chunk} prompts, "
        f"{args.repeats} repeats (median (min-max)), {torch.get_num_threads()} threads"
    )
    print("\n".join(lines))
    print(f"batch sweep (s per prompt): { {m: {b: round(t, 4) for b, t in s.items()} for m, s in sweep.items()} }")
    print(
        f"one forward at L={max(distances) + PREFIX}, batch 1: whole LM {fwd['whole_lm'] * 1e3:.1f} ms, "
        f"backbone {fwd['backbone'] * 1e3:.1f} ms; published tool vs per-distance values: max relative "
        f"difference {same_values:.1e}"
    )

    study: list[dict] = []
    ci_lines: list[str] = []
    ref_gamma = float("nan")
    if args.ci_prompts:
        n_list = [int(x) for x in args.ci_prompts.split(",")]
        ref = in_library(model, distances, "one-pass", batches["one-pass"])(777, args.ref_prompts)[0]
        ref_gamma = fit_power_law(np.asarray(distances, float), ref.mean(axis=0)).gamma
        study = ci_study(
            {"nested (one-pass)": procs["one-pass"], "published stream (per-distance)": procs["per-distance"]},
            distances,
            n_list,
            args.ci_repeats,
            ref_gamma,
            args.bootstrap,
        )
        ci_lines = [
            "| prompts | design | bootstrap half-width (mean +- sd) | sd of gamma over seeds | "
            "1.96 sd | coverage of reference gamma |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in sorted(study, key=lambda r: (r["prompts"], r["procedure"])):
            ci_lines.append(
                f"| {r['prompts']} | {r['procedure']} | {r['half_width_mean']:.4f} +- "
                f"{r['half_width_sd']:.4f} | {r['gamma_sd']:.4f} | {r['calibrated_half_width']:.4f} | "
                f"{r['coverage']:.2f} |"
            )
        print(
            f"\nCI study: {args.ci_repeats} seeds per row, reference gamma {ref_gamma:.4f} "
            f"(one-pass, {args.ref_prompts} prompts)"
        )
        print("\n".join(ci_lines))

    atomic_write_json(
        Path(args.out),
        {
            "benchmark": "lens time to CI",
            "distances": distances,
            "target_half_width": args.target,
            "chunk": args.chunk,
            "bootstrap": args.bootstrap,
            "repeats": args.repeats,
            "init": args.init,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "threads": torch.get_num_threads(),
            "batch_sweep_s_per_prompt": sweep,
            "forward_s": fwd,
            "published_vs_per_distance_max_rel_diff": same_values,
            "results": summary,
            "markdown": "\n".join(lines),
            "ci_study": study,
            "ci_reference_gamma": ref_gamma,
            "ci_markdown": "\n".join(ci_lines),
        },
    )


if __name__ == "__main__":
    main()
