"""Speed and memory of every FNA backend against softmax SDPA and the authors' formulation.

Each (method, N, mode) runs in a fresh subprocess so that peak memory is its own:
on the CPU the peak resident set size (ru_maxrss) minus the RSS after the inputs are
allocated and one warm-up call on a tiny problem is done; on CUDA
``torch.cuda.max_memory_allocated`` minus the inputs. Times are the best of ``--repeats``
after one warm-up. Ratios against softmax SDPA come from the same run.

    python benchmarks/attention.py                       # CPU, float32, the issue's grid
    python benchmarks/attention.py --device cuda --dtype bfloat16 --sizes 1024,4096,8192
    python benchmarks/attention.py --queries 1 --modes fwd --methods sdpa_softmax,reference,tiled,auto \
        --repeats 50 --out benchmarks/results/attention_cpu_decode.json   # one decoding step: 1 query, N keys

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

# The default grid; "auto" (fractional_attention's own choice of backend) can be asked for too.
METHODS = ("sdpa_softmax", "authors", "reference", "tiled", "sdpa_fna2", "flex")


def _authors(q, k, v, alpha=1.2):
    """The reference scripts' formulation: cdist, pow, row normalisation (no log domain)."""
    import torch

    d = q.shape[-1]
    kappa = d**0.5 / (2 ** (1 / d) - 1)
    dist = torch.cdist(q, k) / kappa
    phi = (1 + dist).pow(-(d + alpha))
    return (phi / phi.sum(-1, keepdim=True)) @ v


def _call(method: str):
    import torch.nn.functional as F

    from levyattn import fractional_attention

    if method == "sdpa_softmax":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if method == "authors":
        return _authors
    if method == "sdpa_fna2":
        return lambda q, k, v: fractional_attention(q, k, v, alpha=2.0, backend="sdpa")
    return lambda q, k, v: fractional_attention(q, k, v, alpha=1.2, backend=method)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def run_one(method: str, n: int, mode: str, device: str, dtype_name: str, repeats: int, queries: int | None) -> dict:
    """Measure one configuration in this process (called in a subprocess): ``queries`` query rows
    (None: N, self-attention) against N keys."""
    import torch

    dtype = getattr(torch, dtype_name)
    fn = _call(method)
    grad = mode == "fwd+bwd"

    def make(size):
        torch.manual_seed(0)
        rows = [min(size, queries or size), size, size]
        return [torch.randn(1, 4, r, 64, device=device, dtype=dtype, requires_grad=grad) for r in rows]

    def step(q, k, v):
        if grad:
            fn(q, k, v).float().sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)

    # Warm-up on a small problem: imports, kernels, and the tiled backend's compilation (a
    # one-off cost per process whose memory is not the operator's; its kernels take any size).
    from levyattn.backends import tiled

    threshold, tiled.COMPILE_MIN_ELEMENTS = tiled.COMPILE_MIN_ELEMENTS, 0
    step(*make(64))
    tiled.COMPILE_MIN_ELEMENTS = threshold
    q, k, v = make(n)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats + 1):
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


def skip_reason(method: str, n: int, nq: int, mode: str, device: str, memory_limit: float) -> str | None:
    if method == "flex" and device == "cpu" and mode == "fwd+bwd":
        return "no FlexAttention backward on CPU"
    if method in ("authors", "reference"):
        # Several (4, Nq, N) float32 intermediates; more under autograd.
        need = 4 * nq * n * 4 * (8 if mode == "fwd+bwd" else 4)
        if need > memory_limit:
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
        print(json.dumps(run_one(method, int(n), mode, args.device, args.dtype, args.repeats, args.queries)))
        return

    import torch

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            for method in args.methods.split(","):
                reason = skip_reason(method, n, args.queries or n, mode, args.device, args.memory_limit_gib * 2**30)
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
        "shape": "batch 1, 4 heads, head dim 64" + (f", {args.queries} queries against N keys" if args.queries else ""),
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
        "| N | mode | method | time (ms) | x softmax SDPA | peak extra (MiB) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    rows = report["rows"]
    for r in rows:
        base = next(x for x in rows if x["method"] == "sdpa_softmax" and x["N"] == r["N"] and x["mode"] == r["mode"])
        if "seconds" in r:
            lines.append(
                f"| {r['N']} | {r['mode']} | {r['method']} | {r['seconds'] * 1e3:.1f} | "
                f"{r['seconds'] / base['seconds']:.2f} | {r['peak_extra_bytes'] / 2**20:.1f} |"
            )
        else:
            lines.append(f"| {r['N']} | {r['mode']} | {r['method']} | {r.get('skipped') or r.get('error')} | | |")
    return "\n".join(lines)


def _format_row(r: dict, rows: list[dict]) -> str:
    base = next(
        (x for x in rows if x["method"] == "sdpa_softmax" and x["N"] == r["N"] and x["mode"] == r["mode"]), None
    )
    if "seconds" not in r:
        return f"{r['method']:>13} N={r['N']:>6} {r['mode']:>8}  {r.get('skipped') or r.get('error')}"
    ratio = r["seconds"] / base["seconds"] if base and "seconds" in base else float("nan")
    return (
        f"{r['method']:>13} N={r['N']:>6} {r['mode']:>8}  {r['seconds'] * 1e3:10.1f} ms"
        f"  x{ratio:5.2f} vs SDPA  peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB"
    )


if __name__ == "__main__":
    main()
