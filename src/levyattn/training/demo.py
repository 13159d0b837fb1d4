"""``levyattn demo``: FNA at alpha 1.2 vs alpha 2 vs softmax, one layer and one head,
on the digits images and on the synthetic multiscale task. Embedded data only.

Writes into ``out_dir``: ``report.html`` (the table, learning curves and attention
maps, self-contained), ``results.json``, ``table.md``, the PNG figures and one run
folder per model under ``runs/``. About 3-5 minutes on 2 CPU cores; ``quick=True``
trains tiny models on a sliver of the data in seconds (for tests and smoke runs).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from levyattn.io import atomic_write, atomic_write_json, atomic_write_text
from levyattn.training.presets import get_preset, train_preset
from levyattn.training.sweep import attention_gap

VARIANTS = (("fna", 1.2), ("fna", 2.0), ("softmax", None))

# What the demo changes in the presets (one layer and one head in both).
DEMO_TASKS: dict[str, dict[str, Any]] = {
    "digits": {"preset": "digits-vit", "title": "digits 8x8 images (ViT, patch 2)", "set": {}},
    "multiscale": {"preset": "multiscale-1layer", "title": "synthetic multiscale sequences", "set": {}},
}
QUICK = {
    "train": {"epochs": 2, "warmup_steps": 2},
    "data": {"limit_train": 96, "limit_test": 64},
    "model": {"d_model": 16},
}


def variant_name(attention: str, alpha: float | None) -> str:
    return "softmax" if attention == "softmax" else f"FNA alpha={alpha:g}"


def demo_preset(task_key: str, attention: str, alpha: float | None, seed: int, quick: bool) -> dict[str, Any]:
    spec = DEMO_TASKS[task_key]
    preset = get_preset(spec["preset"])
    preset["model"].update(num_layers=1, num_heads=1, attention=attention)
    if alpha is not None:
        preset["model"]["alpha"] = alpha
    preset["train"].update(seed=seed, checkpoint=False)
    if quick:
        for section, values in QUICK.items():
            preset[section].update(copy.deepcopy(values))
    return preset


def _plot_curves(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (task_key, runs) in zip(axes[0], results.items()):
        for run in runs:
            epochs = [r["epoch"] for r in run["history"]]
            ax.plot(epochs, [r["eval_accuracy"] for r in run["history"]], marker="o", ms=3, label=run["variant"])
        ax.set_title(DEMO_TASKS[task_key]["title"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def _plot_attention(maps: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(maps)
    cols = max(len(v) for v in maps.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.4 * cols, 3.2 * len(rows)), squeeze=False)
    for i, task_key in enumerate(rows):
        for j, (variant, weights) in enumerate(maps[task_key]):
            ax = axes[i][j]
            ax.imshow(weights, cmap="viridis", aspect="auto")
            ax.set_title(f"{task_key}: {variant}", fontsize=9)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def _available(task_key: str) -> bool:
    if task_key != "multiscale":
        return True
    try:
        from levyattn.data import make_multiscale_task  # noqa: F401
    except ImportError:
        return False
    return True


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_demo(
    out_dir: str | Path = "levyattn-demo",
    *,
    quick: bool = False,
    seeds: tuple[int, ...] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the demo models (3 variants x 2 tasks x ``seeds``), write the report.

    ``seeds`` defaults to (0, 1, 2), or (0,) with ``quick``. Returns ``{"rows"`` (one per
    task and variant, mean and std over seeds), ``"runs"`` (one per model), ``"table"``
    (Markdown), ``"report"`` (the HTML path), ``"total_s"``, ``"out_dir"``, ``"skipped"}``.
    """
    from levyattn.report import Section, write_html_report
    from levyattn.training.trainer import to_device

    seeds = tuple(seeds) if seeds is not None else ((0,) if quick else (0, 1, 2))
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    maps: dict[str, list[tuple[str, Any]]] = {}
    skipped = []
    for task_key in DEMO_TASKS:
        if not _available(task_key):
            skipped.append(task_key)
            if log:
                log(f"{task_key}: skipped (levyattn.data.make_multiscale_task is not available)")
            continue
        curves[task_key], maps[task_key] = [], []
        for attention, alpha in VARIANTS:
            variant = variant_name(attention, alpha)
            histories = []
            for seed in seeds:
                preset = demo_preset(task_key, attention, alpha, seed, quick)
                if log:
                    log(f"{task_key}: training {variant}, seed {seed} ...")
                run_dir = out / "runs" / f"{task_key}-{variant.replace(' ', '-')}-s{seed}"
                # The demo retrains its models on every call: a re-run replaces its runs.
                result, trainer = train_preset(preset, run_dir, overwrite=True, progress=progress)
                task, model = trainer.task, trainer.model
                _, eval_ds = task.datasets()
                gap = attention_gap(task, model, eval_ds, n_samples=32 if quick else 128)
                if seed == seeds[0]:
                    first = task.collate([eval_ds[0]])
                    weights, valid = task.attention(model, to_device(first, next(model.parameters()).device))
                    w = weights[0][0, 0]
                    if valid is not None:
                        keep = valid[0]
                        w = w[keep][:, keep]
                    maps[task_key].append((variant, w.detach().float().cpu().numpy()))
                run = {"task": task_key, "attention": attention, "alpha": alpha, "variant": variant, "seed": seed,
                       "params": result["params"], "accuracy": result["metrics"]["accuracy"],
                       "spectral_gap": gap["spectral_gap"], "train_time_s": result["train_time_s"],
                       "samples_per_s": result["samples_per_s"], "epochs": len(result["history"])}
                runs.append(run)
                histories.append(result["history"])
                if log:
                    log(f"{task_key}: {variant}, seed {seed}: test accuracy {run['accuracy']:.4f}, spectral gap "
                        f"{run['spectral_gap']:.3f}, {run['train_time_s']:.1f}s")
            # the learning curve: mean test accuracy over seeds, epoch by epoch
            mean_curve = [
                {"epoch": recs[0]["epoch"], "eval_accuracy": sum(r["eval_accuracy"] for r in recs) / len(recs)}
                for recs in zip(*histories)
            ]
            curves[task_key].append({"variant": variant, "history": mean_curve})
    rows = []
    for task_key in curves:
        for attention, alpha in VARIANTS:
            rs = [r for r in runs if r["task"] == task_key and r["attention"] == attention and r["alpha"] == alpha]
            acc, acc_sd = _mean_std([r["accuracy"] for r in rs])
            gap, gap_sd = _mean_std([r["spectral_gap"] for r in rs])
            rows.append({"task": task_key, "attention": attention, "alpha": alpha, "variant": rs[0]["variant"],
                         "seeds": len(rs), "params": rs[0]["params"], "accuracy_mean": acc, "accuracy_std": acc_sd,
                         "gap_mean": gap, "gap_std": gap_sd,
                         "train_time_s": sum(r["train_time_s"] for r in rs) / len(rs),
                         "samples_per_s": sum(r["samples_per_s"] for r in rs) / len(rs)})
    curves_png = _plot_curves(curves, out / "learning_curves.png")
    maps_png = _plot_attention(maps, out / "attention_maps.png")
    header = ["task", "attention", "params", "test accuracy", "spectral gap", "train time (s)", "samples/s"]
    table_rows = [[r["task"], r["variant"], r["params"], f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}",
                   f"{r['gap_mean']:.3f} ± {r['gap_std']:.3f}", round(r["train_time_s"], 1),
                   round(r["samples_per_s"])] for r in rows]
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in table_rows)
    total = time.perf_counter() - t_start
    seed_text = ", ".join(map(str, seeds))
    note = (f"levyattn demo{' --quick' if quick else ''}, seeds {seed_text} (mean ± std over seeds), "
            f"{torch.get_num_threads()} threads, {total:.0f} s in all. One layer, one head everywhere; "
            "only the attention differs.")
    sections = [
        Section("Comparison", text=[
            "FNA (fractional neural attention) replaces softmax's exp(q.k) by the heavy-tailed kernel "
            "(1 + |q-k|/kappa)^-(d+alpha) for alpha < 2 (multiscale, Levy) and by a Gaussian at alpha = 2 "
            "(local, Brownian). Spectral gap = 1 - |lambda_2| of the attention matrices on test inputs: "
            "larger means the attention graph mixes information faster.",
        ], header=header, rows=table_rows),
        Section("Learning curves", text=["Test accuracy after each epoch (mean over seeds)."],
                figures=[curves_png]),
        Section("Attention maps", text=[f"Layer 1, head 1, on the first test input (seed {seeds[0]}; rows: queries)."],
                figures=[maps_png]),
    ]
    report = write_html_report(out / "report.html", "levyattn demo: FNA vs softmax", sections, note=note)
    atomic_write_json(out / "results.json", {"quick": quick, "seeds": list(seeds), "total_s": total, "rows": rows,
                                             "runs": runs, "curves": curves, "skipped": skipped})
    atomic_write_text(out / "table.md", md)
    return {"rows": rows, "runs": runs, "table": md, "report": report, "total_s": total, "out_dir": out,
            "skipped": skipped}


__all__ = ["DEMO_TASKS", "VARIANTS", "run_demo"]
