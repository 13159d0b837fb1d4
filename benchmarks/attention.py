"""Speed and memory of every FNA backend against softmax SDPA and the authors' formulation.

Each (method, N, mode) runs in a fresh subprocess so that peak memory is its own:
on the CPU the peak resident set size (ru_maxrss) minus the RSS after the inputs are
allocated and one warm-up call on a tiny problem is done; on CUDA
``torch.cuda.max_memory_allocated`` minus the inputs. Times are the best of ``--repeats``
after one warm-up. Ratios against softmax SDPA come from the same run.

    python benchmarks/attention.py                       # CPU, float32, the default grid
    python benchmarks/attention.py --device cuda --dtype bfloat16 --sizes 1024,4096,8192
    python benchmarks/attention.py --queries 1 --modes fwd --methods sdpa_softmax,reference,tiled,auto \
        --repeats 50 --out benchmarks/results/attention_cpu_decode.json   # one decoding step: 1 query, N keys
    python benchmarks/attention.py --batch 16 --heads 1 --head-dim 16 --sizes 512 --mask padding+self \
        --methods sdpa_softmax,tiled   # a one-layer qk_share classifier's call: padding mask, no self-pairs

``--causal`` makes every call causal (softmax SDPA through its own ``is_causal`` when there is no
other mask). ``--mask padding`` passes every method an all-keep (B, 1, 1, N) boolean padding mask,
as a padded batch does; ``padding+self`` also excludes the self-pairs (FNA's ``exclude_self``; for
softmax SDPA the masks are combined into one, as levyattn's softmax baseline does with ``qk_share``).
The authors' formulation has no masks and is skipped then. ``--manifold sphere`` runs FNA on the
sphere (the ``tiled`` backend's autograd tiles; ``sdpa_fna2`` and the authors' formulation are
Euclidean and are skipped).

On the CPU, the `tiled` (alpha 1.2) and `sdpa_fna2` (alpha 2) rows also show the arithmetic limit
of their shape (``_limits.attention_limit``: the ratio to softmax SDPA that a kernel as good as
SDPA's at every operation would reach, from operation costs measured in the same run).

Prints a table and writes JSON (default benchmarks/results/attention_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# Each FNA method's alpha, for its arithmetic limit.
LIMIT_ALPHA = {"tiled": 1.2, "sdpa_fna2": 2.0}

# The default grid; "auto" (fractional_attention's own choice of backend) can be asked for too.
METHODS = ("sdpa_softmax", "authors", "reference", "tiled", "sdpa_fna2", "flex")
MASKS = ("none", "padding", "padding+self")


def _authors(q, k, v, alpha=1.2):
    """The reference scripts' formulation: cdist, pow, row normalisation (no log domain)."""
    import torch

    d = q.shape[-1]
    kappa = d**0.5 / (2 ** (1 / d) - 1)
    dist = torch.cdist(q, k) / kappa
    phi = (1 + dist).pow(-(d + alpha))
    return (phi / phi.sum(-1, keepdim=True)) @ v


def _call(method: str, mask: str, causal: bool, manifold: str):
    import torch
    import torch.nn.functional as F

    from levyattn import fractional_attention
    from levyattn.backends.common import combine_keep, structural_keep

    def masks(q, k):
        """(attn_mask, exclude_self) for this call."""
        if mask == "none":
            return None, False
        padding = torch.ones(q.shape[0], 1, 1, k.shape[-2], dtype=torch.bool, device=q.device)
        return padding, mask == "padding+self"

    def softmax(q, k, v):
        attn_mask, exclude_self = masks(q, k)
        nq, nk = q.shape[-2], k.shape[-2]
        if causal and attn_mask is None and nq == nk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if causal or exclude_self:
            attn_mask = combine_keep(attn_mask, structural_keep(0, nq, nq, nk, causal, exclude_self, q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    def fna(q, k, v, alpha=1.2, backend=method):
        attn_mask, exclude_self = masks(q, k)
        return fractional_attention(
            q,
            k,
            v,
            alpha=alpha,
            attn_mask=attn_mask,
            exclude_self=exclude_self,
            is_causal=causal,
            manifold=manifold,
            backend=backend,
        )

    if method == "sdpa_softmax":
        return softmax
    if method == "authors":
        return _authors
    if method == "sdpa_fna2":
        return lambda q, k, v: fna(q, k, v, alpha=2.0, backend="sdpa")
    return fna


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def run_one(method: str, n: int, mode: str, args: argparse.Namespace) -> dict:
    """Measure one configuration in this process (called in a subprocess): ``args.queries`` query
    rows (None: N, self-attention) against N keys, of shape (batch, heads, rows, head dim)."""
    import torch

    device, queries = args.device, args.queries
    dtype = getattr(torch, args.dtype)
    fn = _call(method, args.mask, args.causal, args.manifold)
    grad = mode == "fwd+bwd"

    def make(size):
        torch.manual_seed(0)
        rows = [min(size, queries or size), size, size]
        shapes = [(args.batch, args.heads, r, args.head_dim) for r in rows]
        return [torch.randn(*s, device=device, dtype=dtype, requires_grad=grad) for s in shapes]

    def step(q, k, v):
        if grad:
            fn(q, k, v).float().sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)

    # Warm-up on a small problem: imports, kernels, and loading the tiled backend's fused CPU
    # kernel (built once and cached; a one-off cost whose memory is not the operator's).
    step(*make(64))
    q, k, v = make(n)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(args.repeats + 1):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        step(q, k, v)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # The gradients of q, k, v are outputs of the step, as large as the inputs.
    return {"seconds": min(times[1:]), "peak_extra_bytes": max(0, peak)}


def skip_reason(method: str, n: int, mode: str, args: argparse.Namespace) -> str | None:
    if method == "flex" and args.device == "cpu" and mode == "fwd+bwd":
        return "no FlexAttention backward on CPU"
    if method == "authors" and (args.mask != "none" or args.causal):
        return "the authors' formulation has no masks"
    if method in ("authors", "sdpa_fna2") and args.manifold != "euclidean":
        return "Euclidean only"
    if method in ("authors", "reference"):
        # Several (B, H, Nq, N) float32 intermediates; more under autograd.
        need = args.batch * args.heads * (args.queries or n) * n * 4 * (8 if mode == "fwd+bwd" else 4)
        if need > args.memory_limit_gib * 2**30:
            return f"needs ~{need / 2**30:.0f} GiB"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,4096,16384")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queries", type=int, default=None, help="query rows (default N: self-attention)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mask", choices=MASKS, default="none", help="masks passed to every method (see above)")
    parser.add_argument("--causal", action="store_true", help="causal attention for every method")
    parser.add_argument("--manifold", choices=("euclidean", "sphere"), default="euclidean")
    parser.add_argument("--memory-limit-gib", type=float, default=12.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", metavar="JSON", help="print a results JSON as a markdown table and exit")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.one:
        method, n, mode = args.one
        print(json.dumps(run_one(method, int(n), mode, args)))
        return

    import torch
    from _limits import attention_limit  # imports torch: not for --markdown and --one

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            for method in args.methods.split(","):
                reason = skip_reason(method, n, mode, args)
                result = {"method": method, "N": n, "mode": mode}
                if reason is None:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--device",
                        args.device,
                        "--dtype",
                        args.dtype,
                        "--repeats",
                        str(args.repeats),
                        *(["--queries", str(args.queries)] if args.queries else []),
                        *("--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim)),
                        *("--mask", args.mask),
                        *(["--causal"] if args.causal else []),
                        *("--manifold", args.manifold),
                        "--one",
                        method,
                        str(n),
                        mode,
                    ]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode == 0:
                        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                    else:
                        result["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"
                else:
                    result["skipped"] = reason
                if args.device == "cpu" and method in LIMIT_ALPHA and "seconds" in result:
                    result["limit"] = attention_limit(mode, args.head_dim, LIMIT_ALPHA[method])
                rows.append(result)
                print(_format_row(result, rows), flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "device_name": device_name,
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "shape": f"batch {args.batch}, {args.heads} heads, head dim {args.head_dim}"
        + (f", {args.queries} queries against N keys" if args.queries else "")
        + ("" if args.mask == "none" else f", mask {args.mask}")
        + (", causal" if args.causal else "")
        + ("" if args.manifold == "euclidean" else f", {args.manifold}"),
        "rows": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"attention_{args.device}.json")
    from levyattn.io import atomic_write_json

    atomic_write_json(out, report)
    print(f"\nwrote {out}")


def markdown(report: dict) -> str:
    """The results as a markdown table: time, ratio to softmax SDPA, peak extra memory."""
    lines = [
        f"{report['device_name']} ({report['device']}, {report['cpu_count']} threads), torch {report['torch']}, "
        f"{report['dtype']}, {report['shape']}",
        "",
        "| N | mode | method | time (ms) | x softmax SDPA | limit | peak extra (MiB) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    rows = report["rows"]
    for r in rows:
        base = next(x for x in rows if x["method"] == "sdpa_softmax" and x["N"] == r["N"] and x["mode"] == r["mode"])
        if "seconds" in r:
            lines.append(
                f"| {r['N']} | {r['mode']} | {r['method']} | {r['seconds'] * 1e3:.1f} | "
                f"{r['seconds'] / base['seconds']:.2f} | {_limit_text(r)} | {r['peak_extra_bytes'] / 2**20:.1f} |"
            )
        else:
            lines.append(f"| {r['N']} | {r['mode']} | {r['method']} | {r.get('skipped') or r.get('error')} | | | |")
    return "\n".join(lines)


def _format_row(r: dict, rows: list[dict]) -> str:
    base = next(
        (x for x in rows if x["method"] == "sdpa_softmax" and x["N"] == r["N"] and x["mode"] == r["mode"]), None
    )
    if "seconds" not in r:
        return f"{r['method']:>13} N={r['N']:>6} {r['mode']:>8}  {r.get('skipped') or r.get('error')}"
    ratio = r["seconds"] / base["seconds"] if base and "seconds" in base else float("nan")
    limit = f" (limit x{r['limit']:.2f})" if "limit" in r else ""
    return (
        f"{r['method']:>13} N={r['N']:>6} {r['mode']:>8}  {r['seconds'] * 1e3:10.1f} ms"
        f"  x{ratio:5.2f} vs SDPA{limit}  peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB"
    )


def _limit_text(r: dict) -> str:
    return f"{r['limit']:.2f}" if "limit" in r else ""


if __name__ == "__main__":
    main()
