"""Generation speed of the causal LM: prefill time and per-token decode rate, with and
without the key/value cache.

For each attention kind (FNA alpha 1.2 and softmax) and each context length, a small,
randomly initialised ``CausalLM`` continues a random prompt of that length by
``--new-tokens`` tokens greedily. The two phases are timed separately, because a single
"tokens/s" over the whole call is dominated by the prompt's prefill at long contexts and
hides what the cache buys:

- **prefill**: the forward pass over the prompt that yields the first new token (the same
  work with or without the cache, plus filling the cache);
- **decode**: the remaining ``new_tokens - 1`` steps. With the cache each step runs the
  model on one token against the cached keys/values (O(N) attention per step); without it
  every step re-runs the whole prefix (O(N^2) per step). Reported as tokens/s and ms/token.

The loop is the one ``CausalLM.generate`` runs (same forward calls); the benchmark checks
that its tokens equal ``generate``'s, with and without the cache. Timings are the best of
``--repeats`` after one warm-up.

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


@torch.no_grad()
def timed_greedy(model: CausalLM, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple:
    """Greedy continuation of prompt (1, P) -> (new ids (1, new_tokens), prefill s, decode s)."""
    cache = model.new_cache() if use_cache else None
    t0 = time.perf_counter()
    logits = (model(prompt, cache=cache) if use_cache else model(prompt)).logits
    ids = torch.cat([prompt, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = (model(ids[:, -1:], cache=cache) if use_cache else model(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    t2 = time.perf_counter()
    return ids[:, prompt.shape[1] :], t1 - t0, t2 - t1


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
    same = True
    for use_cache in (True, False):
        key = "cached" if use_cache else "uncached"
        timed_greedy(model, prompt[:, :8], 2, use_cache)  # warm-up
        prefill, decode = float("inf"), float("inf")
        for _ in range(repeats):
            ids, p_s, d_s = timed_greedy(model, prompt, new_tokens, use_cache)
            prefill, decode = min(prefill, p_s), min(decode, d_s)
        tokens[key] = ids
        # The timed loop must be the real thing: the same tokens as the library's generate.
        ref = model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)[:, context:]
        same = same and bool(torch.equal(ids, ref))
        steps = new_tokens - 1
        out[f"{key}_prefill_s"] = prefill
        out[f"{key}_decode_s"] = decode
        out[f"{key}_decode_tokens_per_s"] = steps / decode if steps else float("nan")
        out[f"{key}_decode_ms_per_token"] = 1e3 * decode / steps if steps else float("nan")
        out[f"{key}_total_tokens_per_s"] = new_tokens / (prefill + decode)
    out["decode_speedup"] = out["cached_decode_tokens_per_s"] / out["uncached_decode_tokens_per_s"]
    out["same_tokens"] = same and bool(torch.equal(tokens["cached"], tokens["uncached"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,512,2048", help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (>= 2: one prefill + decode)")
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
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be >= 2 (the first token comes from the prefill), got {args.new_tokens}")
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    kinds = [a.strip() for a in args.attention.split(",")]

    rows = []
    for context in contexts:  # the kinds one after the other at each context: a drift of the machine's load
        for attention in kinds:  # between contexts does not fall on one kind only
            r = measure(attention, context, args.new_tokens, args.repeats, args)
            rows.append(r)
            print(f"  {attention:8s} context {context:5d}: decode cached {r['cached_decode_tokens_per_s']:8.1f} "
                  f"tok/s, uncached {r['uncached_decode_tokens_per_s']:8.1f} tok/s; prefill "
                  f"{1e3 * r['cached_prefill_s']:.1f} ms", file=sys.stderr, flush=True)

    softmax = {r["context"]: r["cached_decode_ms_per_token"] for r in rows if r["attention"] == "softmax"}
    for r in rows:  # the time per cached token over softmax's at the same context
        r["cached_decode_vs_softmax"] = r["cached_decode_ms_per_token"] / softmax.get(r["context"], float("nan"))
    rows.sort(key=lambda r: (kinds.index(r["attention"]), r["context"]))
    header = ("| attention | context | prefill ms (cached) | prefill ms (uncached) | decode tok/s (cached) "
              "| decode tok/s (uncached) | decode ms/token (cached) | decode ms/token (uncached) "
              "| decode speedup | cached decode vs softmax | same tokens |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(
            f"| {r['attention']} | {r['context']} | {1e3 * r['cached_prefill_s']:.1f} | "
            f"{1e3 * r['uncached_prefill_s']:.1f} | {r['cached_decode_tokens_per_s']:.1f} | "
            f"{r['uncached_decode_tokens_per_s']:.1f} | {r['cached_decode_ms_per_token']:.2f} | "
            f"{r['uncached_decode_ms_per_token']:.2f} | {r['decode_speedup']:.1f}x | "
            f"{r['cached_decode_vs_softmax']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |"
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
