"""The lens at real scale: peak memory and time of row capture against the eager path, and the model's own inference.

Rows (each in a fresh subprocess, so every peak is its own):

- ``inference``: the model's own forward pass (its backbone, SDPA attention, no KV cache) on
  the same batches of prompts the lens runs: the reference peak.
- ``lens eager``: ``measure_decay(capture="eager")``, the path the lens took before row
  capture: the eager attention implementation with ``output_attentions``, every layer's
  (B, H, L, L) weights materialised.
- ``lens rows``: ``measure_decay()`` (row capture): fused SDPA outputs, only the query rows the
  published protocol reads computed as weights.

The published protocol, one pass per prompt (the causal shortcut) at ``max(d) + 50`` tokens
(2050 for the published grid). Memory on the CPU: peak resident set size (RSS) of the process
while the row runs, sampled every 5 ms from /proc/self/statm, and the RSS of the loaded model
before it (weights plus the Python/torch runtime); on a GPU (``--device cuda``): the peak of
``torch.cuda.max_memory_allocated`` during the row and the memory allocated by the loaded
model. Time: wall clock (on a GPU after a synchronisation) and CPU time (user + system, all
threads) of the row alone, model construction excluded. The model is built with random
weights from a real architecture's config (no download): ``smollm-135m`` (SmolLM-135M: Llama,
30 layers, 9 heads, 3 KV heads, hidden 576), ``llama-3.2-1b`` or ``pythia-1b``. The A(d) of
the two lens rows are compared (max relative difference).

    python benchmarks/lens_scale.py                                    # 135M: inference, eager, rows
    python benchmarks/lens_scale.py --model llama-3.2-1b --rows rows inference --prompts 2
    python benchmarks/lens_scale.py --model llama-3.2-1b --device cuda --dtype bfloat16 \
        --distances 10 20 50 100 200 500 1000 2000 4000 8000    # 8k context on a GPU

Writes benchmarks/results/lens_scale_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from levyattn.io import atomic_write_json

warnings.filterwarnings("ignore")

CONFIGS = {
    "smollm-135m": (
        "LlamaConfig",
        dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
             tie_word_embeddings=True),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
             tie_word_embeddings=True),
    ),
    "pythia-1b": (
        "GPTNeoXConfig",
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192,
             vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True),
    ),
}  # fmt: skip
ROWS = ("inference", "eager", "rows")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def build_model(name: str, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """A random-weight causal LM of the named architecture (its default attention), built on ``device``."""
    import transformers

    cls, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**kwargs)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(getattr(torch, dtype)).eval()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakCUDA:
    """The highest GPU memory allocated by PyTorch while the block runs."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


class PeakRSS:
    """The highest resident set size seen while the block runs (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def child(args: argparse.Namespace) -> dict:
    """One row in this process: returns its wall and CPU time, peak RSS and A(d)."""
    from levyattn.lens import measure_decay
    from levyattn.lens.prompts import PREFIX, Prompts

    model = build_model(args.model, args.device, args.dtype)
    length = max(args.distances) + PREFIX
    cuda = args.device.startswith("cuda")
    loaded = torch.cuda.memory_allocated() if cuda else _rss()
    out: dict = {"row": args.child, "loaded_bytes": loaded}
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakCUDA() if cuda else PeakRSS() as peak, torch.inference_mode():
        if args.child == "inference":
            body = model.base_model
            for seed in args.seeds:
                ids = Prompts(1000, 49_000, None, "random").draw(seed, args.prompts, length)
                for p0 in range(0, args.prompts, args.batch_size):
                    batch = torch.as_tensor(ids[p0 : p0 + args.batch_size], device=args.device)
                    body(input_ids=batch, use_cache=False)
        else:
            m = measure_decay(
                model,
                distances=args.distances,
                n_prompts=args.prompts,
                seeds=args.seeds,
                batch_size=args.batch_size,
                causal=True,
                capture="eager" if args.child == "eager" else "auto",
            )
            out["aggregate"] = m.aggregate.tolist()
            out["attention_path"] = m.info["attention_path"]
    out.update(
        wall_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
        peak_bytes=peak.peak,
        n_params=sum(p.numel() for p in model.base_model.parameters()),
    )
    return out


def run_row(args: argparse.Namespace, row: str) -> dict:
    cmd = [sys.executable, __file__, "--child", row, "--model", args.model, "--prompts", str(args.prompts),
           "--batch-size", str(args.batch_size), "--seeds", *map(str, args.seeds), "--device", args.device,
           "--dtype", args.dtype,
           "--distances", *map(str, args.distances)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"row {row} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(row: dict, ref: dict | None, key: str) -> str:
    return f"{row[key] / ref[key]:.2f}x" if ref else "-"


def main() -> None:
    from levyattn.lens import PUBLISHED_DISTANCES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(CONFIGS), default="smollm-135m")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--prompts", type=int, default=2, help="prompts per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--distances", type=int, nargs="+", default=list(PUBLISHED_DISTANCES))
    p.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on the CPU, allocated on a GPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--child", choices=ROWS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    results = {row: run_row(args, row) for row in args.rows}
    gib = 2.0**30
    memory = "GPU allocated" if args.device.startswith("cuda") else "RSS"
    inf = results.get("inference")
    eager = results.get("eager")
    lines = [
        f"| row | wall s | CPU s | peak {memory} GiB | loaded model GiB | peak / inference | wall / eager "
        "| peak / eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results.items():
        r["peak_over_inference"] = r["peak_bytes"] / inf["peak_bytes"] if inf else None
        r["wall_over_eager"] = r["wall_s"] / eager["wall_s"] if eager else None
        r["peak_over_eager"] = r["peak_bytes"] / eager["peak_bytes"] if eager else None
        lines.append(
            f"| {'lens ' + row if row != 'inference' else 'model inference'} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_bytes'] / gib:.2f} | {r['loaded_bytes'] / gib:.2f} | "
            f"{_ratio(r, inf, 'peak_bytes')} | {_ratio(r, eager, 'wall_s')} | "
            f"{_ratio(r, eager, 'peak_bytes')} |"
        )
    agreement = None
    if "eager" in results and "rows" in results:
        a, b = np.asarray(results["eager"]["aggregate"]), np.asarray(results["rows"]["aggregate"])
        agreement = float(np.max(np.abs(a - b) / np.abs(a)))
    n_params = next(iter(results.values()))["n_params"]
    length = max(args.distances) + 50
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"model: random-weight {args.model} ({n_params / 1e6:.0f}M parameters in the backbone, {args.dtype}), "
        f"published protocol one pass per prompt at {length} tokens, {args.prompts} prompt(s) x seeds {args.seeds}, "
        f"batch {args.batch_size}, {device}"
    )
    print("\n".join(lines))
    if agreement is not None:
        print(f"A(d) rows vs eager: max relative difference {agreement:.1e}")
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}_{length}"
    out = Path(args.out or Path(__file__).parent / "results" / f"lens_scale_{args.model}{suffix}.json")
    atomic_write_json(
        out,
        {
            "benchmark": "lens scale",
            "model": args.model,
            "config": CONFIGS[args.model][1],
            "n_params_backbone": n_params,
            "length": length,
            "prompts_per_seed": args.prompts,
            "seeds": args.seeds,
            "batch_size": args.batch_size,
            "device": device,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "threads": torch.get_num_threads(),
            "results": results,
            "aggregate_max_rel_diff_rows_vs_eager": agreement,
            "markdown": "\n".join(lines),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
