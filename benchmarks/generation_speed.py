"""Generation speed of the causal LM: tokens/s with and without the key/value cache.

For each attention kind (FNA alpha 1.2 and softmax) and each context length, a small,
randomly initialised ``CausalLM`` continues a random prompt of that length by
``--new-tokens`` tokens greedily (temperature 0), once with the KV cache and once
without (every step re-runs the whole prefix). Reported: new tokens per second (best
of ``--repeats``, after one warm-up) and whether both decodings produced the same
tokens (they must: the cache changes the cost only).

    python benchmarks/generation_speed.py                          # contexts 128, 512, 2048
    python benchmarks/generation_speed.py --contexts 128,512 --new-tokens 8

Prints a markdown table and writes JSON (default benchmarks/results/generation_cpu.json).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from levyattn.io import atomic_write_json
from levyattn.models.lm import CausalLM, CausalLMConfig


def measure(attention: str, context: int, new_tokens: int, repeats: int, args) -> dict:
    torch.manual_seed(args.seed)
    config = CausalLMConfig(
        vocab_size=args.vocab_size,
        block_size=context + new_tokens,  # no sliding window: the cache is never rebuilt
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        attention=attention,
        alpha=1.2,
    )
    model = CausalLM(config).eval()
    g = torch.Generator().manual_seed(args.seed + context)
    prompt = torch.randint(0, args.vocab_size, (1, context), generator=g)
    out = {"attention": attention, "context": context, "new_tokens": new_tokens}
    tokens = {}
    for use_cache in (True, False):
        model.generate(prompt[:, :8], 2, temperature=0.0, use_cache=use_cache)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ids = model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
            best = min(best, time.perf_counter() - t0)
        key = "cached" if use_cache else "uncached"
        tokens[key] = ids[:, context:]
        out[f"{key}_s"] = best
        out[f"{key}_tokens_per_s"] = new_tokens / best
    out["speedup"] = out["cached_tokens_per_s"] / out["uncached_tokens_per_s"]
    out["same_tokens"] = bool(torch.equal(tokens["cached"], tokens["uncached"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,512,2048", help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--attention", default="fna,softmax", help="comma-separated: fna, softmax")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the machine has 2 cores)")
    p.add_argument("--out", default="benchmarks/results/generation_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    kinds = [a.strip() for a in args.attention.split(",")]

    rows = []
    for attention in kinds:
        for context in contexts:
            r = measure(attention, context, args.new_tokens, args.repeats, args)
            rows.append(r)
            print(f"  {attention:8s} context {context:5d}: cached {r['cached_tokens_per_s']:8.1f} tok/s, "
                  f"uncached {r['uncached_tokens_per_s']:8.1f} tok/s", file=sys.stderr, flush=True)

    header = "| attention | context | cached tok/s | uncached tok/s | speedup | same tokens |"
    lines = [header, "|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(
            f"| {r['attention']} | {r['context']} | {r['cached_tokens_per_s']:.1f} | "
            f"{r['uncached_tokens_per_s']:.1f} | {r['speedup']:.1f}x | {'yes' if r['same_tokens'] else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    result = {
        "benchmark": "generation_speed",
        "command": "python benchmarks/generation_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "model": {"d_model": args.d_model, "num_layers": args.num_layers, "num_heads": args.num_heads,
                  "vocab_size": args.vocab_size, "alpha": 1.2, "batch": 1, "decoding": "greedy"},
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
        "markdown": table,
    }
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
