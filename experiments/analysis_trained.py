"""Random-walk statistics of *trained* models: FNA alpha 1.2, FNA alpha 2 and softmax.

Every model is trained through the real trainer from the package's presets
(``levyattn.training.presets.train_preset``, checkpoints in a temporary run folder), with the
same seeds and budget for the three attention kinds; the only change between them is
``model.attention`` (and ``model.alpha``). Tasks:

- ``digits``: preset ``digits-vit`` as is (one layer, one head, 8x8 digits in 4x4 patches:
  4 tokens, mean pooling, 15 epochs);
- ``digits-p2``: the same with ``model.patch_size=2`` (16 tokens), for a less trivial walk;
- ``multiscale``: preset ``multiscale-1layer`` as is (64-token synthetic sequences, one
  layer, one head, orthogonal, qk_share, rescale off, 12 epochs).

Each trained model is reloaded from its checkpoint (``levyattn.training.load_model``), run
on the first ``--examples`` test inputs (``task.attention``: padding masked), and every
(layer, example, head) attention matrix is analysed with ``levyattn.analysis`` through the
same code as ``levyattn analyze RUN --preset-data N``: spectral gap ``1 - |lambda_2|``,
mixing steps (TV <= 1/4), mean shortest path with edge length ``-log P_ij`` and in hops
(edges ``P_ij >= 1/n``), normalised row entropy. Reported: means over matrices per run,
then mean ± std (sample std, ddof = 1) over seeds; test accuracy on the whole test split.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python experiments/analysis_trained.py [--seeds 0,1,2] [--examples 128]

Prints a table, writes experiments/results/analysis_trained.json and
experiments/figures/analysis_trained.png (spectral gap vs test accuracy, one point per run).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from levyattn.analysis import attention_summary
from levyattn.io import atomic_write, atomic_write_json
from levyattn.training import load_model
from levyattn.training.presets import apply_overrides, get_preset, train_preset

ROOT = Path(__file__).resolve().parent
TASKS = {
    "digits": ("digits-vit", []),
    "digits-p2": ("digits-vit", ["model.patch_size=2"]),
    "multiscale": ("multiscale-1layer", []),
}
VARIANTS = (("FNA alpha=1.2", "fna", 1.2), ("FNA alpha=2", "fna", 2.0), ("softmax", "softmax", None))
METRICS = ("spectral_gap", "mixing_steps", "mean_path_length", "mean_hops", "row_entropy_normalised")


def measure(run_dir: Path, task, n_examples: int) -> dict:
    """Random-walk statistics of the checkpoint in ``run_dir`` on the first test inputs."""
    model = load_model(run_dir).eval()
    _, test = task.datasets()
    n = min(n_examples, len(test))
    batch = task.collate([test[i] for i in range(n)])
    weights, valid = task.attention(model, batch)
    mask = None if valid is None else valid.numpy()
    records = []
    for i, w in enumerate(weights):
        w = w.detach().double()
        w = w.unsqueeze(1) if w.dim() == 3 else w
        part = attention_summary({f"layer{i}": w.numpy()}, mask=mask)
        records.extend(part["records"])
    out = {"n_examples": n, "n_matrices": len(records)}
    for key in METRICS:
        vals = [r[key] for r in records if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
        out[f"{key}_null_fraction"] = 1 - len(vals) / len(records)
    return out


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof = 1, as the sweep and the demo report it) of the values that
    are not None; std None for one value (no spread), both None for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def fmt(m: float | None, s: float | None, digits: int = 3) -> str:
    if m is None:
        return "n/a"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def plot(runs: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2, 4.4))
    ax = fig.add_subplot()
    markers = dict(zip(TASKS, "osD"))
    colours = dict(zip([v[0] for v in VARIANTS], ("tab:blue", "tab:orange", "tab:green")))
    seen = set()
    for r in runs:
        label = f"{r['task']}, {r['variant']}"
        ax.scatter(r["spectral_gap"], r["accuracy"], marker=markers[r["task"]], color=colours[r["variant"]],
                   s=36, alpha=0.8, label=None if label in seen else label)
        seen.add(label)
    ax.set_xlabel("spectral gap 1 - |λ2| (mean over test matrices)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Trained one-layer models: spectral gap vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--epochs", type=int, default=None, help="override every preset's epochs (default: keep)")
    parser.add_argument("--out", default=str(ROOT / "results" / "analysis_trained.json"))
    parser.add_argument("--figure", default=str(ROOT / "figures" / "analysis_trained.png"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = args.tasks.split(",")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"--tasks: unknown task {t!r}; valid: {sorted(TASKS)}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="analysis_trained_") as tmp:
        for task_key in tasks:
            preset_name, overrides = TASKS[task_key]
            for variant, attention, alpha in VARIANTS:
                for seed in seeds:
                    sets = [*overrides, f"model.attention={attention}", f"train.seed={seed}"]
                    if args.epochs is not None:
                        sets.append(f"train.epochs={args.epochs}")
                    if alpha is not None:
                        sets.append(f"model.alpha={alpha}")
                    preset = apply_overrides(get_preset(preset_name), sets)
                    run_dir = Path(tmp) / f"{task_key}-{attention}-{alpha}-{seed}"
                    t0 = time.perf_counter()
                    result, trainer = train_preset(preset, run_dir)
                    train_s = time.perf_counter() - t0
                    stats = measure(run_dir, trainer.task, args.examples)
                    row = {"task": task_key, "preset": preset_name, "overrides": sets, "variant": variant,
                           "seed": seed, "accuracy": result["metrics"]["accuracy"], "params": result["params"],
                           "train_time_s": train_s, **stats}
                    runs.append(row)
                    # Written after every run, so an interrupted benchmark keeps what it measured.
                    atomic_write_json(Path(args.out), {"partial": True, "seeds": seeds, "runs": runs})
                    print(f"{task_key:10s} {variant:14s} seed {seed}: acc {row['accuracy']:.4f} "
                          f"gap {row['spectral_gap']:.4f} mixing {row['mixing_steps']} "
                          f"path {row['mean_path_length']} hops {row['mean_hops']} ({train_s:.1f}s)", flush=True)
    total_s = time.perf_counter() - t_start

    table = []
    for task_key in tasks:
        for variant, _, _ in VARIANTS:
            rs = [r for r in runs if r["task"] == task_key and r["variant"] == variant]
            agg = {"task": task_key, "variant": variant, "seeds": len(rs), "n_matrices": rs[0]["n_matrices"]}
            for key in ("accuracy", *METRICS):
                agg[key], agg[f"{key}_std"] = mean_std([r[key] for r in rs])
            agg["mixing_null_fraction"] = float(np.mean([r["mixing_steps_null_fraction"] for r in rs]))
            agg["path_null_fraction"] = float(np.mean([r["mean_path_length_null_fraction"] for r in rs]))
            table.append(agg)
    header = ("| task | attention | accuracy | spectral gap | mixing steps | path (-log P) | path (hops) "
              "| entropy / log n | mixing n/a |")
    lines = [header, "|" + "---|" * 9]
    for a in table:
        lines.append(
            f"| {a['task']} | {a['variant']} | {fmt(a['accuracy'], a['accuracy_std'], 4)} "
            f"| {fmt(a['spectral_gap'], a['spectral_gap_std'])} | {fmt(a['mixing_steps'], a['mixing_steps_std'], 1)} "
            f"| {fmt(a['mean_path_length'], a['mean_path_length_std'], 2)} "
            f"| {fmt(a['mean_hops'], a['mean_hops_std'], 2)} "
            f"| {fmt(a['row_entropy_normalised'], a['row_entropy_normalised_std'])} "
            f"| {a['mixing_null_fraction']:.2f} |"
        )
    print("\n".join(lines))
    print(f"total {total_s:.0f} s")
    fig = plot(runs, Path(args.figure))
    atomic_write_json(Path(args.out), {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seeds": seeds, "examples": args.examples, "total_time_s": total_s, "table": table, "runs": runs,
        "table_markdown": "\n".join(lines), "figure": Path(fig).name,
    })
    print(f"wrote {args.out} and {fig}")


if __name__ == "__main__":
    main()
