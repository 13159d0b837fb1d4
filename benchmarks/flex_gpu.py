"""FNA through FlexAttention on a CUDA GPU, against softmax SDPA's flash kernel and FlexAttention's own softmax.

Three paths on the same (B, H, N, D) inputs, interleaved round by round in one process, timed with
CUDA events (median of ``--rounds``), forward+backward (or forward only):

- ``sdpa flash``: ``scaled_dot_product_attention`` restricted to its FlashAttention kernel;
- ``flex softmax``: compiled ``flex_attention`` with no score modifier (FlexAttention's own cost);
- ``flex FNA``: ``fractional_attention(..., backend="flex")`` at ``--alpha`` (the score modifier
  turns the augmented q.k into log Phi; q and k gain their squared norms, in two bfloat16
  halves each, so the dot product runs at head dim D + 4, padded to a multiple of 16).

FNA over flex softmax is the price of the kernel itself; flex softmax over flash is FlexAttention's
distance from a hand-written kernel. ``--decompose`` splits the price in two with two more paths:
``flex softmax D+16`` (q and k padded with zeros to FNA's augmented head dim, which FlexAttention
rounds up to the next power of two) and ``flex power law`` (a score modifier with FNA's per-pair
work, ``-e log1p(c sqrt|s|)``, at head dim D). Peak memory is ``torch.cuda.max_memory_allocated`` above the
inputs, for one call of each path. With ``--profile N`` the CUDA kernels of one forward+backward of
each path at that length are listed (torch.profiler), the longest first.

    python benchmarks/flex_gpu.py                                   # bf16, N = 2048 ... 16384
    python benchmarks/flex_gpu.py --causal --sizes 4096,16384
    python benchmarks/flex_gpu.py --profile 8192

Prints a table and writes JSON (default benchmarks/results/flex_gpu.json, or ..._causal.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from levyattn import fractional_attention
from levyattn.io import atomic_write_json

PATHS = ("sdpa flash", "flex softmax", "flex FNA")


def make_paths(args: argparse.Namespace) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict = {}

    def causal_mask(n, device):
        if n not in masks:
            masks[n] = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, n, n, device=device)
        return masks[n]

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    def flex_softmax(q, k, v):
        block_mask = causal_mask(q.shape[-2], q.device) if args.causal else None
        return compiled(q, k, v, block_mask=block_mask)

    def flex_fna(q, k, v):
        return fractional_attention(q, k, v, alpha=args.alpha, is_causal=args.causal, backend="flex")

    paths = dict(zip(PATHS, (flash, flex_softmax, flex_fna)))
    if args.decompose:

        def padded(q, k, v):
            return flex_softmax(F.pad(q, (0, 16)), F.pad(k, (0, 16)), v)

        def power_law(score, b, h, qi, ki):
            return -(q_dim + args.alpha) * torch.log1p(0.125 * torch.sqrt(score.abs() + 1e-6))

        q_dim = args.head_dim

        def flex_power(q, k, v):
            block_mask = causal_mask(q.shape[-2], q.device) if args.causal else None
            return compiled(q, k, v, score_mod=power_law, block_mask=block_mask)

        paths.update({"flex softmax D+16": padded, "flex power law": flex_power})
    return paths


def step(fn, q, k, v, grad: bool) -> None:
    if grad:
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(torch.ones_like(q))
    else:
        with torch.no_grad():
            fn(q, k, v)


def measure(paths: dict, n: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    grad = args.mode == "fwd+bwd"
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=getattr(torch, args.dtype), requires_grad=grad) for _ in "qkv")
    for fn in paths.values():  # compile and warm up
        for _ in range(2):
            step(fn, q, k, v, grad)
    torch.cuda.synchronize()
    memory = {}
    for name, fn in paths.items():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, q, k, v, grad)
        torch.cuda.synchronize()
        memory[name] = torch.cuda.max_memory_allocated() - base
    times: dict = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.inner):
                step(fn, q, k, v, grad)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / args.inner)
    return {
        "N": n,
        "ms": {name: statistics.median(t) for name, t in times.items()},
        "ms_spread": {name: [min(t), max(t)] for name, t in times.items()},
        "peak_extra_mib": {name: m / 2**20 for name, m in memory.items()},
    }


def profile(paths: dict, n: int, args: argparse.Namespace, top: int = 8) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=getattr(torch, args.dtype), requires_grad=True) for _ in "qkv")
    out = {}
    for name, fn in paths.items():
        step(fn, q, k, v, True)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(fn, q, k, v, True)
            torch.cuda.synchronize()
        rows = [
            (e.key, e.device_time_total / 1000, e.count)
            for e in prof.key_averages()
            if e.device_time_total > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")
        ]
        rows.sort(key=lambda r: -r[1])
        out[name] = [{"kernel": key[:90], "ms": ms, "calls": c} for key, ms, c in rows[:top]]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2048,4096,8192,16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--alpha", type=float, default=1.2)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=5, help="calls per timed round")
    p.add_argument("--decompose", action="store_true", help="also time the two parts of FNA's price (above)")
    p.add_argument("--profile", type=int, default=None, metavar="N", help="also list the CUDA kernels at length N")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flex_gpu.py needs a CUDA GPU")

    paths = make_paths(args)
    rows = [measure(paths, int(n), args) for n in args.sizes.split(",")]
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, B={args.batch} H={args.heads} "
        f"D={args.head_dim}, alpha {args.alpha}, {args.mode}{', causal' if args.causal else ''}, median of "
        f"{args.rounds} rounds x {args.inner} calls"
    )
    lines = [
        "| N | flash (ms) | flex softmax (ms) | flex FNA (ms) | FNA / flash | flex softmax / flash "
        "| FNA / flex softmax "
        "| peak MiB flash / flex softmax / FNA |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ms, mem = r["ms"], r["peak_extra_mib"]
        r["fna_over_flash"] = ms["flex FNA"] / ms["sdpa flash"]
        r["flex_over_flash"] = ms["flex softmax"] / ms["sdpa flash"]
        r["fna_over_flex"] = ms["flex FNA"] / ms["flex softmax"]
        lines.append(
            f"| {r['N']} | {ms['sdpa flash']:.3f} | {ms['flex softmax']:.3f} | {ms['flex FNA']:.3f} | "
            f"{r['fna_over_flash']:.2f}x | {r['flex_over_flash']:.2f}x | {r['fna_over_flex']:.2f}x | "
            f"{mem['sdpa flash']:.0f} / {mem['flex softmax']:.0f} / {mem['flex FNA']:.0f} |"
        )
    if args.decompose:
        lines.append("")
        lines.append("| N | flex softmax D+16 / flex softmax | flex power law / flex softmax |")
        lines.append("|---:|---:|---:|")
        for r in rows:
            ms = r["ms"]
            lines.append(
                f"| {r['N']} | {ms['flex softmax D+16'] / ms['flex softmax']:.2f}x | "
                f"{ms['flex power law'] / ms['flex softmax']:.2f}x |"
            )
    print("\n".join(lines))
    default = f"flex_gpu{'_causal' if args.causal else ''}{'_fwd' if args.mode == 'fwd' else ''}.json"
    out = Path(args.out or Path(__file__).parent / "results" / default)
    record = {
        "benchmark": "flex on a GPU",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "machine": platform.platform(),
        "args": vars(args),
        "rows": rows,
        "markdown": "\n".join(lines),
    }
    atomic_write_json(out, record)
    if args.profile:
        record["profile"] = profile(paths, args.profile, args)
        for name, top in record["profile"].items():
            print(f"\n{name}, N={args.profile}, one forward+backward: CUDA kernels, longest first")
            for row in top:
                print(f"  {row['ms']:8.3f} ms  x{row['calls']}  {row['kernel']}")
        atomic_write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
