"""Sweeps: a preset trained over alpha x attention x seed, with resumable per-run results.

Layout of a sweep folder ``OUT``::

    OUT/runs/<run>/          one trainer folder per run (checkpoints, metrics.csv, ...)
    OUT/runs/<run>/result.json   written atomically when the run has finished
    OUT/results.json         every run, the summary per (attention, alpha), correlations
    OUT/runs.csv  OUT/summary.csv  OUT/table.md

``<run>`` is ``fna-a1.2-s0`` or ``softmax-s0`` (softmax has no alpha). When the sweep is run
again, a run may have changed only what a resumed run may change (:func:`check_rerun`: where
the data lies and the trainer's ``RESUME_NEUTRAL`` training settings; the description is no
setting); any other change stops the sweep with an error naming each changed setting. A run
whose ``result.json`` exists is skipped, its result kept, unless ``epochs`` or ``max_steps``
changed: then it is resumed from its checkpoint and trained on to the new length (fewer steps
than it has trained are refused, as by ``levyattn train --resume``), and its result replaced. A
run that was interrupted resumes from its last checkpoint (exactly, as ``levyattn train
--resume``), and one killed before its first checkpoint, which has nothing to resume, starts
over. A run folder whose checkpoint is missing or corrupt while it holds weights or metrics
(a run killed while it wrote its first checkpoint, or one whose checkpoint.json was removed)
stops the sweep with an error naming the file and the folder to delete to train the run
again: the sweep never trains over a run it cannot continue.

Restarts (``restarts=R``, as scikit-learn's ``KMeans(n_init=R)``): small models can stop
on a plateau that is decided by their initialisation (a one-layer, one-head model may stay
at chance on one seed and learn on the next). With ``R > 1`` every (attention, alpha,
seed) is trained R times on the same data, restart ``r`` from the initialisation and
batch order of :func:`restart_seed` (restart 0 is the plain run, so ``R = 1`` is the
ordinary sweep), and the restart with the lowest final training loss is kept: no test
data enters the choice. Restart folders are ``<run>-r1``, ``<run>-r2``, ...; the summary
and the correlations are over the kept runs, and ``results.json`` lists every restart
with ``selected`` marking the kept one.

Every row records the task's headline metric under its own name (``accuracy``
for classification, ``bleu`` for translation, ``ppl`` for language models, where lower is
better) and the summary has ``<metric>_mean`` and ``<metric>_std``. When the sweep trains
softmax beside FNA, every alpha is compared with softmax seed by seed
(:func:`levyattn.training.compare.paired_comparison`, in the metric's direction) and the
table states each comparison in a sentence with its bootstrap interval and sign test.

For every trained model the sweep measures the spectral gap ``1 - |lambda_2|`` of its
attention matrices on test inputs (``levyattn.analysis.spectral_gap``; mean over
layers, heads and inputs) and reports the Pearson and Spearman correlation of the test
metric with the gap over all runs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levyattn.io import atomic_write_json, atomic_write_text, markdown_table, read_json, rows_to_csv
from levyattn.training.checkpoint import JSON_NAME
from levyattn.training.compare import format_spread, paired_comparison, verdict_sentence
from levyattn.training.presets import (
    RESUME_NEUTRAL_DATA,
    check_requirements,
    preset_from_run,
    run_changes,
    train_preset,
)
from levyattn.training.tasks import check_preset, make_task
from levyattn.training.trainer import RESUME_NEUTRAL, TrainConfig, existing_run_files

ATTENTIONS = ("fna", "softmax")


def run_name(attention: str, alpha: float | None, seed: int, restart: int = 0) -> str:
    name = f"softmax-s{seed}" if attention == "softmax" else f"fna-a{alpha:g}-s{seed}"
    return f"{name}-r{restart}" if restart else name


def restart_seed(seed: int, restart: int) -> int:
    """The training seed (initialisation and batch order) of restart ``restart`` of ``seed``:
    ``seed`` itself for restart 0, else a 32-bit seed drawn from numpy's
    ``SeedSequence([seed, restart])``, so restarts of different seeds do not share streams."""
    if restart == 0:
        return seed
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])


def grid(
    alphas: Sequence[float], attentions: Sequence[str], seeds: Sequence[int], restarts: int = 1
) -> list[dict[str, Any]]:
    """The runs of a sweep: FNA at every alpha, softmax once per seed, each ``restarts`` times."""
    from levyattn.config import check_alpha, check_int

    for a in attentions:
        if a not in ATTENTIONS:
            raise ValueError(f"attention must be among {ATTENTIONS}, got {a!r}")
    if "fna" in attentions and not alphas:
        raise ValueError("alphas must list at least one alpha in (0, 2] for FNA runs")
    alphas = [check_alpha(float(a)) for a in alphas]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    check_int("restarts", restarts, 1)
    # A repeated value would name one run twice: trained once, listed twice in runs.csv and results.json.
    for name, values in (("attentions", list(attentions)), ("seeds", seeds)):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise ValueError(f"{name} must be distinct, got {repeated!r} more than once in {values!r}")
    first_by_name: dict[str, int] = {}
    for i, a in enumerate(alphas):
        first = first_by_name.setdefault(run_name("fna", a, 0), i)
        if first != i:
            other = alphas[first]
            raise ValueError(f"alphas must differ in their first 6 significant digits (the run names show those), "
                             f"got {other!r} and {a!r} in {alphas!r}")
    runs = []
    for attention in attentions:
        for alpha in alphas if attention == "fna" else [None]:
            for seed in seeds:
                for restart in range(restarts):
                    runs.append({"name": run_name(attention, alpha, seed, restart), "attention": attention,
                                 "alpha": alpha, "seed": seed, "restart": restart,
                                 "train_seed": restart_seed(seed, restart)})
    return runs


def run_preset(base: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    preset = copy.deepcopy(base)
    preset["model"]["attention"] = run["attention"]
    if run["alpha"] is not None:
        preset["model"]["alpha"] = run["alpha"]
    preset["train"]["seed"] = run["train_seed"]
    return check_preset(preset)


def select_restarts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark in each row whether it is the kept restart of its (attention, alpha, seed): the one
    with the lowest final training loss (ties: the earlier restart). Returns the kept rows."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        key = (r["attention"], r["alpha"], r["seed"])
        if key not in best or r["final_train_loss"] < best[key]["final_train_loss"]:
            best[key] = r
    for r in runs:
        r["selected"] = best[(r["attention"], r["alpha"], r["seed"])] is r
    return [r for r in runs if r["selected"]]


def check_rerun(saved: Any, preset: dict[str, Any], source: Path) -> None:
    """ValueError naming every changed setting unless the run trained with the ``saved`` preset
    (read from ``source``) may go on under ``preset``: the changes a resumed run accepts
    (:func:`levyattn.training.presets.run_changes`)."""
    changes = run_changes(saved, preset) if isinstance(saved, dict) else ["preset: not recorded"]
    if changes:
        raise ValueError(
            f"{source} was trained with other settings than this sweep asks for: {'; '.join(changes)}. A run of a "
            f"sweep run again may change only where its data lies ({', '.join(RESUME_NEUTRAL_DATA)}) and the "
            f"training settings a resumed run may change ({', '.join(RESUME_NEUTRAL)}; epochs not under the cosine "
            "schedule); use another output folder or delete that run"
        )


def _length(preset: dict[str, Any]) -> tuple[int, int | None]:
    """How long a preset trains: its (epochs, max_steps)."""
    cfg = TrainConfig.from_dict(preset["train"])
    return cfg.epochs, cfg.max_steps


def attention_gap(task: Any, model: torch.nn.Module, eval_ds: Any, n_samples: int = 64) -> dict[str, Any]:
    """Mean spectral gap of ``model``'s attention on the first ``n_samples`` test inputs.

    Returns ``{"spectral_gap": mean, "spectral_gap_std": std, "per_layer": [...]}``; each
    (B, H, L, L) matrix is restricted to valid (non-padding) tokens.
    """
    try:
        from levyattn.analysis import spectral_gap
    except ImportError:  # the analysis package without a re-export
        from levyattn.analysis.spectral import spectral_gap

    n = min(n_samples, len(eval_ds))
    batch = task.collate([eval_ds[i] for i in range(n)])
    device = next(model.parameters()).device
    from levyattn.training.batches import to_device

    batch = to_device(batch, device)
    was_training = model.training
    model.eval()
    try:
        weights, valid = task.attention(model, batch)
    finally:
        model.train(was_training)
    per_layer = []
    allgaps = []
    for w in weights:
        w = w.detach().double().cpu()
        if w.dim() == 3:  # averaged over heads
            w = w.unsqueeze(1)
        mask = None if valid is None else valid.cpu().unsqueeze(1).expand(w.shape[0], w.shape[1], -1)
        gaps = np.asarray(spectral_gap(w, mask=mask), dtype=np.float64).ravel()
        per_layer.append(float(np.nanmean(gaps)))
        allgaps.append(gaps)
    flat = np.concatenate(allgaps) if allgaps else np.array([np.nan])
    return {"spectral_gap": float(np.nanmean(flat)), "spectral_gap_std": float(np.nanstd(flat)),
            "per_layer": per_layer}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _mean_std(values: list[float | None]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1) of the finite values: NaN for none, std None for one (one
    seed has no spread; a 0 would read as seeds that agree exactly)."""
    arr = np.asarray([v for v in values if _finite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else None


def correlations(x: list[float], y: list[float]) -> dict[str, Any]:
    """Pearson and Spearman correlation of x and y (NaN when undefined), with n."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)]
    out: dict[str, Any] = {"n": len(pairs), "pearson_r": float("nan"), "pearson_p": float("nan"),
                           "spearman_r": float("nan"), "spearman_p": float("nan")}
    if len(pairs) < 3:
        return out
    a, b = np.array(pairs).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return out
    pr = stats.pearsonr(a, b)
    sr = stats.spearmanr(a, b)
    out.update(pearson_r=float(pr[0]), pearson_p=float(pr[1]), spearman_r=float(sr[0]), spearman_p=float(sr[1]))
    return out


@dataclass
class SweepResult:
    """``runs``: the kept run of every (attention, alpha, seed), what ``summary``,
    ``comparisons`` and ``correlation`` are over; ``all_runs``: every restart, kept or not
    (the same as ``runs`` with one restart). ``metric``: the task's headline metric, the key
    of its value in every row (``higher_is_better`` its direction)."""

    out_dir: Path | None
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    correlation: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    restarts: int = 1
    all_runs: list[dict[str, Any]] = field(default_factory=list)
    metric: str = "accuracy"
    higher_is_better: bool = True
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """The summary as a Markdown table (mean ± std over seeds; the value alone for one seed),
        then each FNA-versus-softmax comparison in a sentence and the correlation with the gap."""
        m = self.metric
        direction = "" if self.higher_is_better else " (lower is better)"
        header = ["attention", "alpha", "seeds", m + direction, "spectral gap", "parameters", "time (s)"]

        def seeds(row: dict[str, Any]) -> str:
            runs = row["n"] + len(row.get("left_out", []))
            return str(runs) if runs == row["n"] else f"{row['n']} of {runs}"

        def gap(row: dict[str, Any]) -> str:
            runs, gap_n = row["n"] + len(row.get("left_out", [])), row.get("gap_n", row["n"])
            text = format_spread(row["gap_mean"], row["gap_std"], gap_n, ".2g")
            return text if gap_n == runs else f"{text} ({gap_n} of {runs} runs)"

        lines = [markdown_table(header, (
            [row["attention"], "-" if row["alpha"] is None else f"{row['alpha']:g}", seeds(row),
             format_spread(row[f"{m}_mean"], row[f"{m}_std"], row["n"]), gap(row), row["params"],
             f"{row['time_mean']:.1f}"]
            for row in self.summary
        ))]  # fmt: skip
        c = self.correlation
        lines.append("")
        for row in self.summary:
            if row.get("left_out"):
                name = "softmax" if row["alpha"] is None else f"FNA alpha {row['alpha']:g}"
                values = ", ".join(f"seed {seed} ({'no value' if value is None else value})"
                                   for seed, value in zip(row["left_out"], row["left_out_values"]))
                lines.append(f"{name}: {m} over {seeds(row)} seeds; left out, without a finite {m}: {values}")
        if self.restarts > 1:
            lines.append(f"each seed's run: the lowest final training loss of {self.restarts} restarts")
        for comparison in self.comparisons:
            left_out = comparison.get("left_out")
            unpaired = (f" Seeds left out, without a finite {m} on both sides: {', '.join(map(str, left_out))}."
                        if left_out else "")
            if comparison["n"] == 0:
                lines.append(f"{m}, paired by seed: {comparison['a']} - {comparison['b']}: no seed has a finite {m} "
                             f"on both sides, so no comparison.{unpaired}")
            else:
                lines.append(f"{m}, paired by seed: "
                             + verdict_sentence(comparison["a"], comparison["b"], comparison) + unpaired)
        if math.isnan(c["pearson_r"]):
            lines.append(f"{m} vs spectral gap over {c['n']} runs: undefined (needs 3 or more runs, "
                         f"and neither {m} nor gap the same in all)")
        else:
            lines.append(
                f"{m} vs spectral gap over {c['n']} runs: Pearson r = {c['pearson_r']:.3f}"
                f" (p = {c['pearson_p']:.3g}), Spearman rho = {c['spearman_r']:.3f} (p = {c['spearman_p']:.3g})"
            )
        return "\n".join(lines)


def summarise(runs: list[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """One row per (attention, alpha): ``<metric>_mean`` and ``_std`` (sample std, ddof=1; None for
    one seed) over the seeds with a finite metric, ``n`` and ``seeds`` naming those;
    ``left_out`` and ``left_out_values``: the seeds and values of the runs without one (None, NaN
    or infinite), said in the table rather than averaged away; the gap's mean and std over the
    ``gap_n`` runs with a finite gap, the time's over all."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["attention"], r["alpha"]), []).append(r)
    rows = []
    for (attention, alpha), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "fna", kv[0][1] or 0)):
        valued = [r for r in rs if _finite(r.get(metric))]
        unvalued = [r for r in rs if not _finite(r.get(metric))]
        metric_m, metric_s = _mean_std([r[metric] for r in valued])
        gaps = [r.get("spectral_gap") for r in rs]
        gap_m, gap_s = _mean_std(gaps)
        t_m, t_s = _mean_std([r["train_time_s"] for r in rs])
        rows.append({"attention": attention, "alpha": alpha, "n": len(valued), f"{metric}_mean": metric_m,
                     f"{metric}_std": metric_s, "gap_mean": gap_m, "gap_std": gap_s,
                     "gap_n": sum(_finite(g) for g in gaps), "params": rs[0]["params"], "time_mean": t_m,
                     "time_std": t_s, "seeds": [r["seed"] for r in valued],
                     "left_out": [r["seed"] for r in unvalued],
                     "left_out_values": [r.get(metric) for r in unvalued]})
    return rows


def compare_with_softmax(
    runs: list[dict[str, Any]], metric: str = "accuracy", higher_is_better: bool = True
) -> list[dict[str, Any]]:
    """FNA at every alpha against softmax, one pair per seed (matched by its value): for each
    alpha, :func:`~levyattn.training.compare.paired_comparison` of the metric (``a`` = FNA) over
    the seeds where both have a finite metric, with ``a`` and ``b`` naming the two and ``alpha``,
    ``seeds`` (those paired) and ``left_out`` (seeds of either side not paired) added; only ``a``,
    ``b``, ``alpha``, ``seeds``, ``left_out`` and ``n = 0`` where no seed pairs. Empty without
    softmax runs."""
    softmax = {r["seed"]: r.get(metric) for r in runs if r["attention"] == "softmax"}
    if not softmax:
        return []
    alphas = sorted({r["alpha"] for r in runs if r["attention"] == "fna"})
    out = []
    for alpha in alphas:
        fna = {r["seed"]: r.get(metric) for r in runs if r["attention"] == "fna" and r["alpha"] == alpha}
        seeds = sorted(s for s in set(fna) & set(softmax) if _finite(fna[s]) and _finite(softmax[s]))
        left_out = sorted((set(fna) | set(softmax)) - set(seeds))
        names = {"a": f"FNA alpha {alpha:g}", "b": "softmax", "alpha": alpha, "seeds": seeds, "left_out": left_out}
        if not seeds:
            out.append({**names, "n": 0})
            continue
        comparison = paired_comparison([fna[s] for s in seeds], [softmax[s] for s in seeds],
                                       higher_is_better=higher_is_better)
        out.append({**names, **comparison})
    return out


def run_sweep(
    preset: dict[str, Any],
    *,
    alphas: Sequence[float],
    attentions: Sequence[str] = ("fna",),
    seeds: Sequence[int] = (0,),
    restarts: int = 1,
    out_dir: str | Path | None = None,
    progress: bool = False,
    gap_samples: int = 64,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Train every run of the grid (skipping finished ones) and write the tables.

    ``restarts``: trainings per (attention, alpha, seed), the lowest final training loss
    kept (see the module docstring). ``log(message)`` is called before and after each run
    (the CLI prints it).
    """
    check_requirements(preset)  # before the sweep folder is written
    task = make_task(preset)
    if not callable(getattr(task, "attention", None)):
        raise ValueError(f"the {task.name!r} task has no attention(model, batch) method: a sweep measures the "
                         "spectral gap of every trained model's attention")
    metric, higher_is_better = task.metric, task.higher_is_better
    out = Path(out_dir) if out_dir is not None else None
    runs_done: list[dict[str, Any]] = []
    skipped: list[str] = []
    plan = grid(alphas, attentions, seeds, restarts)
    for i, run in enumerate(plan):
        rp = run_preset(preset, run)
        run_dir = out / "runs" / run["name"] if out is not None else None
        result_file = run_dir / "result.json" if run_dir is not None else None
        finished = result_file is not None and result_file.is_file()
        if finished:
            stored = read_json(result_file, "sweep run result")
            check_rerun(stored.get("preset"), rp, result_file)
        if finished and _length(stored["preset"]) == _length(rp):
            # Rows stored before restarts existed lack the restart fields (the plan has them) and the
            # final training loss (their history has it: they ran whole epochs). Rows stored before the
            # metric had its own key hold it as "accuracy", whatever the task.
            row = {**stored["row"], **run, "metric": metric}
            if metric not in row and "accuracy" in row:
                row[metric] = row.pop("accuracy")
            if "final_train_loss" not in row:
                row["final_train_loss"] = stored["history"][-1]["train_loss"]
            runs_done.append(row)
            skipped.append(run["name"])
            if log:
                log(f"[{i + 1}/{len(plan)}] {run['name']}: done before, skipped")
            continue
        # Resume what has a checkpoint (the trainer refuses a folder with weights or metrics but
        # no checkpoint.json); start over only a run killed before its first checkpoint.
        files = existing_run_files(run_dir) if run_dir is not None else []
        resume = bool(files) and files != ["config.json"]
        if resume and JSON_NAME not in files:
            raise FileNotFoundError(
                f"cannot go on with sweep run {run_dir}: {run_dir / JSON_NAME} not found (it holds "
                f"{', '.join(files)}); nothing was changed. A run killed while it wrote its first checkpoint leaves "
                f"this, and one whose {JSON_NAME} was removed: delete {run_dir} to train the run again"
            )
        if resume:
            check_rerun(preset_from_run(run_dir), rp, run_dir / JSON_NAME)
        if log:
            doing = ("training on to the new epochs or max_steps" if finished else "resuming" if resume
                     else "starting over (killed before its first checkpoint)" if files else "training")
            log(f"[{i + 1}/{len(plan)}] {run['name']}: {doing}")
        t0 = time.perf_counter()
        result, trainer = train_preset(rp, run_dir, resume=resume, overwrite=not resume, progress=progress)
        _, eval_ds = trainer.task.datasets()
        gap = attention_gap(trainer.task, trainer.model, eval_ds, gap_samples)
        row = {**run, "metric": metric, metric: result["metrics"].get(metric), "loss": result["metrics"].get("loss"),
               "spectral_gap": gap["spectral_gap"], "spectral_gap_std": gap["spectral_gap_std"],
               "final_train_loss": result["train_loss"], "params": result["params"],
               "train_time_s": result["train_time_s"], "samples_per_s": result["samples_per_s"],
               "wall_s": time.perf_counter() - t0}
        if result_file is not None:
            atomic_write_json(result_file, {"row": row, "gap_per_layer": gap["per_layer"], "preset": rp,
                                            "history": result["history"]})
        runs_done.append(row)
        if log:
            log(f"[{i + 1}/{len(plan)}] {run['name']}: {metric} {row[metric]:.4f}, "
                f"spectral gap {row['spectral_gap']:.2g}, {row['train_time_s']:.1f}s")
    kept = select_restarts(runs_done)
    summary = summarise(kept, metric)
    comparisons = compare_with_softmax(kept, metric, higher_is_better)
    corr = correlations([r[metric] for r in kept], [r["spectral_gap"] for r in kept])
    res = SweepResult(out, kept, summary, corr, skipped, restarts=restarts, all_runs=runs_done, metric=metric,
                      higher_is_better=higher_is_better, comparisons=comparisons)
    if out is not None:
        atomic_write_json(out / "results.json", {"preset": preset, "alphas": list(alphas),
                                                 "attention": list(attentions), "seeds": list(seeds),
                                                 "restarts": restarts, "metric": metric,
                                                 "higher_is_better": higher_is_better, "runs": runs_done,
                                                 "summary": summary, "comparisons": comparisons,
                                                 "correlation": corr})
        atomic_write_text(out / "runs.csv", rows_to_csv(runs_done))
        atomic_write_text(out / "summary.csv", rows_to_csv(summary))
        atomic_write_text(out / "table.md", res.table() + "\n")
    return res


__all__ = ["ATTENTIONS", "SweepResult", "attention_gap", "check_rerun", "compare_with_softmax", "correlations", "grid",
           "restart_seed", "run_name", "run_sweep", "select_restarts", "summarise"]
