"""Training throughput (samples/s) of FNA vs softmax at the same model size.

Times full optimiser steps (forward, cross-entropy, backward, AdamW) of the same
model with FNA (alpha 1.2 and alpha 2) and with softmax attention, on random inputs.
The three variants are interleaved round by round and each reports its median step
time, so background load on a shared machine hits them alike.

    python benchmarks/training_throughput.py                     # text classifier, CPU
    python benchmarks/training_throughput.py --model vit --seq 64 --batch 32
    python benchmarks/training_throughput.py --preset imdb-6layer --batch 8   # a preset's own model

With ``--tile-loop`` a fourth variant, FNA alpha 1.2 with the tiled backend's fused CPU kernel
switched off (``LEVYATTN_COMPILE=0``: every call through the tile loop), shows what the kernel
buys in a whole step.

With ``--preset`` the model is the preset's (layers, heads, hidden size, dropout, FNA options)
at its data's shapes (IMDb: max_len tokens and the default vocabulary; images: the dataset's
size and channels; language models: block_size tokens of the preset's vocabulary, a token loss
at every position); only the attention is switched.

With ``--profile N`` each variant also runs N steps under torch.profiler, and a second table
says where a step's time goes: attention forward and backward (the fused kernel's or SDPA's),
the input check of FNA, matrix products (linear layers), the other operators (elementwise,
normalisation, optimiser), and the rest (Python, autograd and dispatch, outside any operator).

Prints a table and writes JSON (default benchmarks/results/training_throughput.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from _record import write_record

from levyattn.data.text import DEFAULT_IMDB_VOCAB
from levyattn.io import markdown_table
from levyattn.models import CausalLM, build_model
from levyattn.training.presets import get_preset

# (attention, alpha, tiled path): "auto" is the backend's own choice, "tile loop" has its fused CPU
# kernel switched off.
VARIANTS = (("fna", 1.2, "auto"), ("fna", 2.0, "auto"), ("softmax", None, "auto"))
TILE_LOOP = ("fna", 1.2, "tile loop")
# Operators by the part of a step they do (self time; "other operators" takes the rest).
PROFILE_PARTS = {
    "attention forward": ("levyattn_fna_cpu::forward", "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "attention backward": (
        "levyattn_fna_cpu::backward",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "input check": ("levyattn_fna_cpu::peaks",),
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
}
# (channels, side) of the image datasets the ViT presets train on.
IMAGE_SHAPES = {"cifar10": (3, 32), "mnist": (1, 28), "fashion_mnist": (1, 28), "digits": (1, 8)}


def make_from_preset(name: str, attention: str, alpha: float | None, batch: int) -> tuple[torch.nn.Module, tuple, dict]:
    """The preset's model with its attention switched, and random inputs of its data's shapes."""
    preset = get_preset(name)
    cfg = {**preset["model"], "attention": attention}
    if alpha is not None:
        cfg["alpha"] = alpha
    data = preset["data"]
    g = torch.Generator().manual_seed(0)
    if preset["model_type"] == "text_classifier" and data["dataset"] == "imdb":
        seq, vocab = int(data.get("max_len", 512)), int(data.get("vocab_size", DEFAULT_IMDB_VOCAB))
        m = build_model("text_classifier", dict(cfg, vocab_size=vocab, num_classes=2, max_len=seq))
        inputs = (torch.randint(0, vocab, (batch, seq), generator=g),)
        return m, inputs, {"key_padding_mask": torch.zeros(batch, seq, dtype=torch.bool)}
    if preset["model_type"] == "vit" and data["dataset"] in IMAGE_SHAPES:
        channels, side = IMAGE_SHAPES[data["dataset"]]
        m = build_model("vit", dict(cfg, image_size=side, in_channels=channels, num_classes=10))
        return m, (torch.randn(batch, channels, side, side, generator=g),), {}
    if preset["model_type"] == "lm":
        seq, vocab = int(data["block_size"]), int(data["vocab_size"])
        m = build_model("lm", dict(cfg, vocab_size=vocab, block_size=seq))
        return m, (torch.randint(0, vocab, (batch, seq), generator=g),), {}
    raise ValueError(f"--preset {name!r}: only IMDb text-classifier, image ViT and language-model presets can be timed")


def make(model: str, attention: str, alpha: float | None, args) -> tuple[torch.nn.Module, tuple, dict]:
    if args.preset:
        return make_from_preset(args.preset, attention, alpha, args.batch)
    common = dict(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads, attention=attention, dropout=0.0)
    if alpha is not None:
        common["alpha"] = alpha
    g = torch.Generator().manual_seed(0)
    if model == "text":
        m = build_model("text_classifier", dict(vocab_size=1000, num_classes=2, max_len=args.seq, **common))
        inputs = (torch.randint(0, 1000, (args.batch, args.seq), generator=g),)
        kwargs = {"key_padding_mask": torch.zeros(args.batch, args.seq, dtype=torch.bool)}
    else:
        side = int(round(args.seq**0.5))
        m = build_model("vit", dict(image_size=side * 2, patch_size=2, in_channels=3, num_classes=10, **common))
        inputs = (torch.randn(args.batch, 3, side * 2, side * 2, generator=g),)
        kwargs = {}
    return m, inputs, kwargs


def profile_steps(step, key, steps: int) -> dict:
    """Milliseconds per step of variant ``key`` in each part of PROFILE_PARTS, in the other
    operators, and outside any operator (the step's wall time less its operators' self time:
    Python, autograd's engine, dispatch), over ``steps`` steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = sum(step(key) for _ in range(steps))
    # Operators: ATen's and the fused kernel's (the other events are Python and autograd ranges).
    operators = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if "::" in e.key
                 and e.key.split("::")[0] in ("aten", "levyattn_fna_cpu")}  # fmt: skip
    parts = {part: sum(operators.pop(name, 0.0) for name in names) for part, names in PROFILE_PARTS.items()}
    parts["other operators"] = sum(operators.values())
    parts["outside operators"] = 1e3 * wall / steps - sum(parts.values())
    return {"step_ms": 1e3 * wall / steps, "parts_ms": parts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("text", "vit"), default="text")
    p.add_argument("--preset", default=None, help="time this preset's model instead (--batch still applies)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sample (vit: patches)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tile-loop", action="store_true", help="also FNA alpha 1.2 without the fused CPU kernel")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N steps of each variant: where a step's time goes",
    )
    p.add_argument("--out", default="benchmarks/results/training_throughput.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setups = {}
    for attention, alpha, path in VARIANTS + ((TILE_LOOP,) if args.tile_loop else ()):
        torch.manual_seed(0)
        m, inputs, kwargs = make(args.model, attention, alpha, args)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        # A class per sample, or (language models) a target token per position: the inputs
        # themselves, since what is timed does not depend on which tokens are the targets.
        labels = inputs[0] if isinstance(m, CausalLM) else torch.randint(0, 2, (args.batch,))
        setups[(attention, alpha, path)] = (m, inputs, kwargs, opt, labels)

    def step(key) -> float:
        m, inputs, kwargs, opt, labels = setups[key]
        with mock.patch.dict(os.environ, {"LEVYATTN_COMPILE": "0"} if key[2] == "tile loop" else {}):
            t0 = time.perf_counter()
            logits = m(*inputs, **kwargs).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0

    for key in setups:  # warm-up
        step(key)
        step(key)
    times: dict = {key: [] for key in setups}
    for _ in range(args.steps):
        for key in setups:
            times[key].append(step(key))
    rows = []
    soft = statistics.median(times[("softmax", None, "auto")])
    for (attention, alpha, path), ts in times.items():
        med = statistics.median(ts)
        params = sum(x.numel() for x in setups[(attention, alpha, path)][0].parameters())
        rows.append(
            {
                "attention": attention,
                "alpha": alpha,
                "tiled_path": path,
                "params": params,
                "median_step_s": med,
                "samples_per_s": args.batch / med,
                "time_vs_softmax": med / soft,
            }
        )
    if args.preset:
        setting = f"preset {args.preset}"
    else:
        setting = (
            f"model {args.model}, seq {args.seq}, d_model {args.d_model}, layers {args.layers}, heads {args.heads}"
        )
    print(f"{setting}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    alphas = ["-" if r["alpha"] is None else f"{r['alpha']:g}" for r in rows]
    header = ["attention", "alpha", "tiled path"]
    print(markdown_table(
        [*header, "parameters", "step (ms)", "samples/s", "time / softmax"],
        ([r["attention"], a, r["tiled_path"], r["params"], f"{1000 * r['median_step_s']:.1f}",
          f"{r['samples_per_s']:.1f}", f"{r['time_vs_softmax']:.2f}x"] for r, a in zip(rows, alphas)),
    ))  # fmt: skip
    if args.profile:
        profiles = {key: profile_steps(step, key, args.profile) for key in setups}
        for r, prof in zip(rows, profiles.values()):
            r["profile"] = prof
        parts = list(next(iter(profiles.values()))["parts_ms"])
        print(f"\nWhere a step's time goes (ms per step, mean of {args.profile} profiled steps)")
        print(markdown_table(
            [*header, "step", *parts],
            ([r["attention"], a, r["tiled_path"], f"{r['profile']['step_ms']:.1f}",
              *(f"{r['profile']['parts_ms'][part]:.1f}" for part in parts)] for r, a in zip(rows, alphas)),
        ))  # fmt: skip
    write_record(args.out, args, rows)


if __name__ == "__main__":
    main()
