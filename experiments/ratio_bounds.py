"""What the query of the "ratio" task can read from each kernel's weights, before any training.

The task (``kind="ratio"`` in ``levyattn.data.synthetic``): label 1 iff the farther of two
markers is at least ``ratio`` times as far from the query as the nearer. At the query a
distance kernel weighs the markers ``w_a`` and ``w_b``; this script takes the positions'
real geometry (the preset's fixed positions), computes ``log(w_a / w_b)`` for each kernel
on every item and reports the best accuracy of one threshold on it: the threshold (and,
for the power law, the content terms) fitted on the training split, the accuracy measured
on the test split. Learned content terms add a constant to ``log(w_a / w_b)`` for the
Gaussian and for softmax (up to their cross terms with the positions, left out here), which
the fitted threshold absorbs; for the power law they add
``c_a`` and ``c_b`` under the square roots, searched on a grid.

Also, as references: any rule on the integer gap difference ``g_b - g_a`` (a lookup table
fitted on the training split), either gap alone, and the log ratio of the gaps (1.0 by
construction).

These are accuracies of one readout route, not bounds on a trained model: the markers'
own attention rows and the feed-forward layer carry other evidence. With ``--runs`` (a
folder of the preset's trained runs, as ``experiments/synthetic_alpha.py`` writes them) the
same one-threshold readout is measured on each trained model's own attention: on the
query's row (``log(w_a / w_b)``) and on the markers' rows (``log w(a -> Q) - log w(b -> Q)``),
beside the model's test accuracy, to see which route the trained models use.

    python experiments/ratio_bounds.py
    python experiments/ratio_bounds.py --preset multiscale-ratio-brownian-1layer --set data.task_args.ratio=1.5
    python experiments/ratio_bounds.py --runs runs/bench-synthetic-ratio-brownian \
        --out experiments/results/ratio_bounds_trained.json

Prints a table and writes JSON (default experiments/results/ratio_bounds.json).
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from levyattn.data import make_multiscale_task
from levyattn.io import atomic_write_json
from levyattn.models.common import brownian_positions, sinusoidal_positions
from levyattn.training.presets import apply_overrides, get_preset

CONTENT_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def threshold_rule(score_train, y_train):
    """The threshold and side (1: predict 1 above) with the best training accuracy."""
    order = np.argsort(score_train, kind="stable")
    s, y = score_train[order], y_train[order]
    ones_below = np.concatenate([[0], np.cumsum(y)])  # label-1 items among the first i
    n, n_ones = len(y), y.sum()
    above_is_one = (np.arange(n + 1) - ones_below + (n_ones - ones_below)) / n
    best = int(np.argmax(np.maximum(above_is_one, 1 - above_is_one)))
    cut = -math.inf if best == 0 else math.inf if best == n else (s[best - 1] + s[best]) / 2
    return cut, 1 if above_is_one[best] >= 0.5 else 0


def threshold_accuracy(score_train, y_train, score_test, y_test):
    """(training accuracy, test accuracy) of the best one-threshold rule fitted on training."""
    rule = threshold_rule(score_train, y_train)
    return tuple(
        float(np.mean(((s > rule[0]) == bool(rule[1])) == y)) for s, y in ((score_train, y_train), (score_test, y_test))
    )


def lookup_accuracy(key_train, y_train, key_test, y_test):
    """(training, test) accuracy of the majority label per key, fitted on training (unseen keys: 0)."""
    counts = defaultdict(lambda: [0, 0])
    for k, y in zip(key_train.tolist(), y_train.tolist()):
        counts[k][y] += 1
    rule = {k: int(c[1] > c[0]) for k, c in counts.items()}
    return tuple(
        float(np.mean([rule.get(k, 0) == y for k, y in zip(keys.tolist(), ys.tolist())]))
        for keys, ys in ((key_train, y_train), (key_test, y_test))
    )


def marker_positions(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) positions of marker a and of marker b (a: the one at gap ``marker_distances[:, 0]``)."""
    q, tagged = ds.query_positions, ds.positions  # tagged: (N, 2), sorted
    first_is_a = (tagged[:, 0] - q).abs() == ds.marker_distances[:, 0]
    return torch.where(first_is_a, tagged[:, 0], tagged[:, 1]), torch.where(first_is_a, tagged[:, 1], tagged[:, 0])


def query_geometry(ds, positions: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) squared distance ``sq_a``, ``sq_b`` and dot product ``dot_a``, ``dot_b`` between the
    query's position and marker a's, b's."""
    pq = positions[ds.query_positions.numpy()]
    out = {}
    for name, pos in zip(("a", "b"), marker_positions(ds)):
        out[f"sq_{name}"] = ((pq - positions[pos.numpy()]) ** 2).sum(1)
        out[f"dot_{name}"] = (pq * positions[pos.numpy()]).sum(1)
    return out


def power_law_log_ratio(geo: dict[str, np.ndarray], c_a: float, c_b: float, exponent: float) -> np.ndarray:
    """``log(w_a / w_b)`` of ``(1 + z)^-exponent`` with ``z = sqrt(c + sq)`` (bandwidth 1, kappa 1)."""
    return -exponent * (np.log1p(np.sqrt(c_a + geo["sq_a"])) - np.log1p(np.sqrt(c_b + geo["sq_b"])))


@torch.no_grad()
def trained_log_ratios(model, ds, n: int, batch: int = 500) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """For the first ``n`` items of ``ds``, two (n,) scores from a trained one-layer model's
    attention: ``query``, ``log(w_a / w_b)`` in the query's row (how the query weighs the two
    markers), and ``markers``, ``log w(a -> Q) - log w(b -> Q)`` (how strongly each marker's own
    row weighs the query); and the model's (n,) predicted labels, from the same forward pass."""
    pos_a, pos_b = marker_positions(ds)
    out = {"query": [], "markers": []}
    predicted = []
    for start in range(0, min(n, len(ds)), batch):
        stop = min(start + batch, n, len(ds))
        output = model(ds.input_ids[start:stop], output_attentions=True)
        predicted.append(output.logits.argmax(-1).numpy())
        w = output.attentions[0].mean(1).double()  # (B, L, L), heads averaged (the presets have one)
        log_w = w.clamp_min(torch.finfo(torch.float64).tiny).log()
        rows, q, a, b = torch.arange(stop - start), ds.query_positions[start:stop], pos_a[start:stop], pos_b[start:stop]
        out["query"].append((log_w[rows, q, a] - log_w[rows, q, b]).numpy())
        out["markers"].append((log_w[rows, a, q] - log_w[rows, b, q]).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(predicted)


@torch.no_grad()
def trained_rows(runs_dir: str, train, test, n_fit: int) -> list[dict]:
    """For every run under ``runs_dir/runs``: the model's test accuracy and the accuracy of one
    threshold on each score of :func:`trained_log_ratios` (fitted on the first ``n_fit``
    training items)."""
    from levyattn.training.checkpoint import load_checkpoint, model_from_checkpoint

    y_fit, y_test = np.asarray(train.labels[:n_fit]), np.asarray(test.labels)
    rows = []
    for run_path in sorted(Path(runs_dir, "runs").iterdir()):
        ckpt = load_checkpoint(run_path)
        model = model_from_checkpoint(ckpt, "text_classifier").eval()
        c = ckpt.model_config
        fit, _ = trained_log_ratios(model, train, n_fit)
        held_out, predicted = trained_log_ratios(model, test, len(test))
        row = {
            "run": run_path.name,
            "attention": c["attention"],
            "alpha": c["alpha"] if c["attention"] == "fna" else None,
            "test_accuracy": float(np.mean(predicted == y_test)),
        }
        for key in fit:
            acc = threshold_accuracy(fit[key], y_fit, held_out[key], y_test)
            row[f"{key}_readout_train_accuracy"], row[f"{key}_readout_test_accuracy"] = acc
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="multiscale-ratio-brownian-1layer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset override")
    parser.add_argument("--alpha", type=float, default=1.2, help="the power law's alpha (< 2)")
    parser.add_argument(
        "--runs",
        help="a gathered runs folder (runs/<name>/ checkpoints) of the preset's models: "
        "also measure the same readout on each trained model's query row and markers' rows",
    )
    parser.add_argument(
        "--fit-items", type=int, default=5000, help="training items the trained-model readout is fitted on"
    )
    parser.add_argument("--out", default="experiments/results/ratio_bounds.json")
    args = parser.parse_args()
    preset = apply_overrides(get_preset(args.preset), args.set)
    task_args = preset["data"]["task_args"]
    if task_args.get("kind") != "ratio":
        parser.error(f"--preset {args.preset} is not a ratio task (kind={task_args.get('kind')!r})")
    if args.fit_items < 1:
        parser.error(f"--fit-items must be at least 1, got {args.fit_items}")
    if not 0 < args.alpha < 2:
        parser.error(f"--alpha must be in (0, 2), got {args.alpha}")
    model = preset["model"]
    if (
        model.get("rescale", True)
        or model.get("bandwidth", 1.0) != 1.0
        or model.get("positional") not in ("brownian", "sinusoidal")
    ):
        parser.error("the preset must have fixed positions, rescale off and bandwidth 1 (the kernel computed here)")
    d_model = model["d_model"]
    head_dim = d_model // model["num_heads"]
    make_positions = brownian_positions if model["positional"] == "brownian" else sinusoidal_positions
    positions = make_positions(task_args["seq_len"], d_model).double().numpy()
    train, test = make_multiscale_task(**task_args)
    y_train, y_test = np.asarray(train.labels), np.asarray(test.labels)
    geo_train, geo_test = query_geometry(train, positions), query_geometry(test, positions)
    gaps_train, gaps_test = train.marker_distances.numpy(), test.marker_distances.numpy()

    rows = []

    def add(route: str, readout: str, acc: tuple[float, float], **extra) -> None:
        rows.append({"route": route, "readout": readout, "train_accuracy": acc[0], "test_accuracy": acc[1], **extra})

    add("gap a alone", "any rule (lookup)", lookup_accuracy(gaps_train[:, 0], y_train, gaps_test[:, 0], y_test))
    add("gap b alone", "any rule (lookup)", lookup_accuracy(gaps_train[:, 1], y_train, gaps_test[:, 1], y_test))
    diff_train, diff_test = gaps_train[:, 1] - gaps_train[:, 0], gaps_test[:, 1] - gaps_test[:, 0]
    add("gap difference g_b - g_a", "any rule (lookup)", lookup_accuracy(diff_train, y_train, diff_test, y_test))
    add(
        "Gaussian (alpha = 2): sq_b - sq_a",
        "one threshold",
        threshold_accuracy(geo_train["sq_b"] - geo_train["sq_a"], y_train, geo_test["sq_b"] - geo_test["sq_a"], y_test),
    )
    add("softmax: dot_a - dot_b", "one threshold",
        threshold_accuracy(geo_train["dot_a"] - geo_train["dot_b"], y_train, geo_test["dot_a"] - geo_test["dot_b"],
                           y_test))  # fmt: skip
    exponent = head_dim + args.alpha
    best = None
    for c_a, c_b in itertools.product(CONTENT_GRID, CONTENT_GRID):
        acc = threshold_accuracy(power_law_log_ratio(geo_train, c_a, c_b, exponent), y_train,
                                 power_law_log_ratio(geo_test, c_a, c_b, exponent), y_test)  # fmt: skip
        if best is None or acc[0] > best[0][0]:
            best = (acc, c_a, c_b)
    add(f"power law (alpha {args.alpha:g})", "one threshold, content terms on a grid", best[0],
        content_a=best[1], content_b=best[2])  # fmt: skip
    log_ratio = (np.log(gaps_train[:, 1] / gaps_train[:, 0]), np.log(gaps_test[:, 1] / gaps_test[:, 0]))
    add("log gap ratio", "one threshold", threshold_accuracy(log_ratio[0], y_train, log_ratio[1], y_test))

    print(
        f"preset {args.preset}: {len(train)} training / {len(test)} test items, ratio {task_args['ratio']}, "
        f"gaps {task_args['d_min']}-{task_args['d_max']}, {model['positional']} positions, head dim {head_dim}"
    )
    print("\n| what the query's weights give | readout | training accuracy | test accuracy |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['route']} | {r['readout']} | {r['train_accuracy']:.4f} | {r['test_accuracy']:.4f} |")
    trained = []
    if args.runs:
        trained = trained_rows(args.runs, train, test, args.fit_items)
        print(
            f"\ntrained models in {args.runs}: one threshold on the query row's log(w_a / w_b), and on the "
            f"markers' rows' log w(a -> Q) - log w(b -> Q), fitted on {min(args.fit_items, len(train))} training items"
        )
        print("| run | model test accuracy | query-row readout, test accuracy | marker-row readout, test accuracy |")
        print("|---|---:|---:|---:|")
        for r in trained:
            print(
                f"| {r['run']} | {r['test_accuracy']:.4f} | {r['query_readout_test_accuracy']:.4f} "
                f"| {r['markers_readout_test_accuracy']:.4f} |"
            )
    atomic_write_json(args.out, {
        "preset": args.preset, "overrides": args.set, "alpha": args.alpha, "head_dim": head_dim,
        "task_args": task_args, "runs": args.runs, "trained": trained, "python": platform.python_version(),
        "rows": rows,
    })  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
