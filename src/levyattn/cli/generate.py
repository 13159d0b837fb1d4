"""``levyattn generate``: continue a prompt with a trained causal language model."""

from __future__ import annotations

import argparse

HELP = "continue a prompt with a trained language-model checkpoint (temperature, top-k, top-p, KV cache)"

EPILOG = """
examples:
  levyattn generate runs/lm-tiny --prompt "Once upon a time" --max-new-tokens 100
  levyattn generate runs/lm-tiny --prompt "The" --temperature 0      # greedy
  levyattn generate runs/lm-tiny --prompt "The" --top-p 0.9 --seed 3 --num-samples 4

CHECKPOINT is a run folder of `levyattn train --preset lm-...` (or its checkpoint.json);
the tokenizer saved beside it is used. --no-cache re-runs the whole context at every step
(the same tokens, only slower).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("checkpoint", help="run folder (or its checkpoint.json) of a language model")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--no-cache", action="store_true", help="do not use the key/value cache")
    parser.add_argument(
        "--stop-at-eos", action="store_true",
        help="stop a sample at the tokenizer's EOS (default: run --max-new-tokens tokens, across any EOS)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from levyattn.training.tasks.lm import generate_text
    from levyattn.training.tasks.tokenized import load_model_with_tokenizer

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    model, tokenizer = load_model_with_tokenizer(args.checkpoint, "lm", device=args.device)
    t0 = time.perf_counter()
    texts, n_new = generate_text(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples, seed=args.seed,
        use_cache=not args.no_cache, stop_at_eos=args.stop_at_eos,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text)
    print(f"{n_new} new tokens in {elapsed:.2f}s ({n_new / max(elapsed, 1e-9):.1f} tokens/s, "
          f"cache {'off' if args.no_cache else 'on'})", file=sys.stderr)
    return 0
