"""`levyattn convert MODEL --out DIR --text FILE...`: retrofit a pretrained causal LM to FNA."""

from __future__ import annotations

import argparse
import sys

HELP = "retrofit a pretrained softmax causal LM to FNA: attention transfer, then a LoRA fine-tune"


def after_interrupt(args: argparse.Namespace) -> str:
    return "continue it with the same command and --resume (the run's arguments and text files again)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from levyattn.config import RetrofitOptions

    d = RetrofitOptions()
    p.add_argument("model", help="a model folder (save_pretrained), a .gguf file, or a hub id (needs network)")
    p.add_argument("--out", required=True, help="folder for the converted model, its checkpoints and report")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 training/calibration text")
    p.add_argument(
        "--eval-text",
        nargs="+",
        default=None,
        metavar="FILE",
        help="held-out UTF-8 text for the perplexities (default: the last tenth of --text's windows)",
    )
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"Lévy index in (0, 2] (default {d.alpha})")
    p.add_argument("--window", type=int, default=d.window, help=f"tokens per window (default {d.window})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    p.add_argument(
        "--calibration-windows",
        type=int,
        default=d.calibration_windows,
        help=f"training windows used at most (default {d.calibration_windows})",
    )
    p.add_argument(
        "--stage1-steps",
        type=int,
        default=d.stage1_steps,
        help=f"attention-transfer steps per layer (default {d.stage1_steps}; 0 skips stage 1)",
    )
    p.add_argument(
        "--qk-rank",
        type=int,
        default=d.qk_rank,
        help=f"rank of the query/key projection update in stage 1 (default {d.qk_rank}; 0: bandwidths only)",
    )
    p.add_argument("--fit-alpha", action="store_true", help="stage 1 also fits one alpha per head")
    p.add_argument(
        "--stage2-steps",
        type=int,
        default=d.stage2_steps,
        help=f"LoRA fine-tuning steps (default {d.stage2_steps}; 0 skips stage 2)",
    )
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    p.add_argument("--stage1-lr", type=float, default=d.stage1_lr, help=f"default {d.stage1_lr}")
    p.add_argument("--stage2-lr", type=float, default=d.stage2_lr, help=f"default {d.stage2_lr}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")


def run(args: argparse.Namespace) -> int:
    from levyattn._extras import require

    require("hf", "transformers", purpose="levyattn convert")
    require("convert", purpose="levyattn convert")
    from levyattn.config import RetrofitOptions
    from levyattn.integrations.hf_retrofit import load_causal_lm, retrofit, text_windows

    options = RetrofitOptions(
        alpha=args.alpha, window=args.window, batch_size=args.batch_size, calibration_windows=args.calibration_windows,
        stage1_steps=args.stage1_steps, stage1_lr=args.stage1_lr, qk_rank=args.qk_rank, fit_alpha=args.fit_alpha,
        stage2_steps=args.stage2_steps, stage2_lr=args.stage2_lr, lora_rank=args.lora_rank, seed=args.seed,
    )  # fmt: skip
    print(f"levyattn convert: loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_causal_lm(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; levyattn convert needs one to read --text")
    train = text_windows(tokenizer, args.text, options.window)
    if args.eval_text:
        evals = text_windows(tokenizer, args.eval_text, options.window)
    else:
        if train.shape[0] < 10:
            raise ValueError(f"--text gives {train.shape[0]} windows; without --eval-text at least 10 are needed")
        cut = train.shape[0] - train.shape[0] // 10
        train, evals = train[:cut], train[cut:]
    print(f"levyattn convert: {train.shape[0]} training windows ({min(train.shape[0], options.calibration_windows)} "
          f"used), {evals.shape[0]} held-out windows of {options.window} tokens", file=sys.stderr)  # fmt: skip
    result = retrofit(
        model, train, evals, args.out, options, tokenizer=tokenizer, resume=args.resume, source=args.model
    )
    print(result.format())
    print(f"\nmodel:  {args.out} (load with attn_implementation='fna')\nreport: {args.out}/retrofit/report.json")
    return 0
