"""Forward+backward time of a GPT-2-small-sized model with eager, sdpa and FNA attention.

One GPT-2 small (12 layers, 12 heads, hidden 768, vocabulary 50257; random weights, no
download) is built once and switched between ``attn_implementation`` "eager", "sdpa" and
"fna" with ``set_attn_implementation``, so every implementation runs the same weights on
the same tokens. One step is ``model(ids, labels=ids).loss.backward()`` at batch 1 in train
mode. Dropout is set to 0 so that the three compute comparable math (with attention dropout,
FNA would take its reference backend, as eager materialises its weights too). FNA runs with
alpha 1.2 and ``fna_backend="auto"`` (which takes the tiled backend at these sizes).

Times are per step, after ``--warmup`` untimed rounds, over ``--repeats`` timed rounds; a
round runs one step of each implementation in turn, so load changes on a shared machine
fall on all three alike. Ratios (of the best times) against eager and sdpa come from the
same run.

    python benchmarks/hf_attention.py                     # 2 threads, lengths 512 and 1024
    python benchmarks/hf_attention.py --lengths 128 --repeats 1 --layers 2   # a quick look

Prints a table and writes JSON (default benchmarks/results/hf_attention.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("eager", "sdpa", "fna")


def _step(model, ids) -> float:
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,1024", help="comma-separated sequence lengths")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--layers", type=int, default=12, help="number of layers (12 = GPT-2 small)")
    parser.add_argument("--alpha", type=float, default=1.2, help="FNA alpha")
    parser.add_argument("--out", default="benchmarks/results/hf_attention.json", help="JSON output path")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if not lengths or min(lengths) < 2 or max(lengths) > 1024:
        parser.error(f"--lengths must lie in [2, 1024] (GPT-2's positions), got {args.lengths!r}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.layers < 1:
        parser.error("--repeats, --threads and --layers must be >= 1, --warmup >= 0")

    import torch
    import transformers
    from tqdm import tqdm

    import levyattn.integrations.huggingface as hf
    from levyattn.io import atomic_write_json

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    hf.configure_fna(config, alpha=args.alpha, bandwidth=1.0, backend="auto")
    model = transformers.GPT2LMHeadModel(config).train()
    params = sum(p.numel() for p in model.parameters())

    rows = []
    # Rounds interleave the implementations (eager, sdpa, fna, eager, ...) so that a change in
    # the load of a shared machine falls on all three alike.
    total = len(lengths) * len(IMPLEMENTATIONS) * (args.warmup + args.repeats)
    with tqdm(total=total, desc="hf_attention", file=sys.stderr) as bar:
        for length in lengths:
            ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
            times: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
            for round_ in range(args.warmup + args.repeats):
                for impl in IMPLEMENTATIONS:
                    model.set_attn_implementation(impl)
                    elapsed = _step(model, ids)
                    if round_ >= args.warmup:
                        times[impl].append(elapsed)
                    bar.update()
            rows.extend({"length": length, "implementation": i, "times_s": times[i]} for i in IMPLEMENTATIONS)

    for row in rows:
        row["best_s"] = min(row["times_s"])
        row["mean_s"] = statistics.fmean(row["times_s"])
    for row in rows:
        same = {r["implementation"]: r["best_s"] for r in rows if r["length"] == row["length"]}
        row["vs_eager"] = row["best_s"] / same["eager"]
        row["vs_sdpa"] = row["best_s"] / same["sdpa"]

    header = f"{'length':>6}  {'attention':>9}  {'best s':>8}  {'mean s':>8}  {'x eager':>7}  {'x sdpa':>6}"
    print(header)
    for r in rows:
        print(
            f"{r['length']:>6}  {r['implementation']:>9}  {r['best_s']:>8.2f}  {r['mean_s']:>8.2f}  "
            f"{r['vs_eager']:>7.2f}  {r['vs_sdpa']:>6.2f}"
        )
    result = {
        "benchmark": "hf_attention",
        "model": f"GPT-2 ({args.layers} layers, 12 heads, hidden 768, vocab 50257), {params} parameters",
        "step": "forward + backward of the LM loss, batch 1, train mode, dropout 0",
        "fna": {"alpha": args.alpha, "bandwidth": 1.0, "backend": "auto"},
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.platform(),
        "command": "python benchmarks/hf_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    out = atomic_write_json(Path(args.out), result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
