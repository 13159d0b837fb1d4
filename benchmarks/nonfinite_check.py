"""What the non-finite rule costs: ``fractional_attention`` with its check of the inputs against
the same call with the check switched off, in the same process, interleaved.

``fractional_attention`` first asks whether any value of q, k, v or a float mask is NaN or
±Inf, and how large q, k and v get (where the fused CPU kernel runs the call, their largest
entries in one compiled call, else the 2-norm of each; one read either way; only when one is not
finite does it look at every value and find the rows that depend on a non-finite one).
That pass reads k and v once more, which would weigh most when the attention itself reads them
only once: a decoding step, one query against a key/value cache. So there (one query row, no
gradients, the fused CPU kernel) the kernel takes the largest entries itself as it reads q, k and
v, and only a call that is not plain goes through the pass. Switching the check off (both ways)
is done here by replacing it for the measurement only; the library has no such switch.

    python benchmarks/nonfinite_check.py
    python benchmarks/nonfinite_check.py --threads 1 2 --repeats 50

Prints a table and writes JSON (default benchmarks/results/nonfinite_check.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _record import write_record

import levyattn.functional as functional
from levyattn import fractional_attention

# (label, (B, H, Nq, d), Nk, forward+backward, heads-second layout: q, k, v are (B, N, H, d) tensors
# seen through .transpose(1, 2), as a model's projections give them)
CASES = (
    ("decode, 4096 cached keys", (1, 8, 1, 64), 4096, False, False),
    ("decode, batch 8, 1024 cached keys", (8, 8, 1, 64), 1024, False, False),
    ("training step, 1024 tokens", (1, 4, 1024, 64), 1024, True, False),
    ("training step, 1024 tokens, transposed views", (1, 4, 1024, 64), 1024, True, True),
)


def _median_ms(
    shape: tuple[int, int, int, int], nk: int, grad: bool, transposed: bool, repeats: int
) -> tuple[float, float]:
    """Median milliseconds of one call (with backward when ``grad``), with and without the check."""
    batch, heads, nq, dim = shape

    def leaf(n: int) -> torch.Tensor:
        if transposed:
            return torch.randn(batch, n, heads, dim).transpose(1, 2).requires_grad_(grad)
        return torch.randn(batch, heads, n, dim, requires_grad=grad)

    q, k, v = leaf(nq), leaf(nk), leaf(nk)

    def call() -> None:
        out = fractional_attention(q, k, v, alpha=1.2)
        if grad:
            out.sum().backward()

    checked, decoding = functional.scan_inputs, functional._is_decoding
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(3):
            call()
        for _ in range(repeats):
            for with_check in (True, False):
                functional.scan_inputs = checked if with_check else (lambda *args: (True, 0.0, 0.0))
                functional._is_decoding = decoding if with_check else (lambda *args: False)
                start = time.perf_counter()
                call()
                times[with_check].append(time.perf_counter() - start)
    finally:
        functional.scan_inputs, functional._is_decoding = checked, decoding
    return 1e3 * statistics.median(times[True]), 1e3 * statistics.median(times[False])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one table row each")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per case (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nonfinite_check.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print("| case | threads | with check (ms) | without (ms) | ratio |\n|---|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, shape, nk, grad, transposed in CASES:
            on, off = _median_ms(shape, nk, grad, transposed, args.repeats if not grad else max(1, args.repeats // 3))
            rows.append({"case": label, "shape": list(shape), "nk": nk, "backward": grad, "threads": threads,
                         "with_check_ms": on, "without_check_ms": off, "ratio": on / off})  # fmt: skip
            print(f"| {label} | {threads} | {on:.2f} | {off:.2f} | {on / off:.2f}x |")
    write_record(args.out, args, rows)


if __name__ == "__main__":
    main()
