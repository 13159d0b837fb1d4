"""What the query of the "ratio" task can read from each kernel's weights, before any training.

The task (``kind="ratio"`` in ``levyattn.data.synthetic``): label 1 iff the farther of two
markers is at least ``ratio`` times as far from the query as the nearer. At the query a
distance kernel weighs the markers ``w_a`` and ``w_b``; this script takes the positions'
real geometry (the preset's fixed positions), computes ``log(w_a / w_b)`` for each kernel
on every item and reports the best accuracy of one threshold on it: the threshold (and,
for the power law, the content terms) fitted on the training split, the accuracy measured
on the test split. Learned content terms add a constant to ``log(w_a / w_b)`` for the
Gaussian and for softmax, which the fitted threshold absorbs; for the power law they add
``c_a`` and ``c_b`` under the square roots, searched on a grid.

Also, as references: any rule on the integer gap difference ``g_b - g_a`` (a lookup table
fitted on the training split), either gap alone, and the log ratio of the gaps (1.0 by
construction).

These are accuracies of one readout route, not bounds on a trained model: the markers'
own attention rows and the feed-forward layer carry other evidence.

    python benchmarks/ratio_bounds.py
    python benchmarks/ratio_bounds.py --preset multiscale-ratio-brownian-1layer --set data.task_args.ratio=1.5

Prints a table and writes JSON (default benchmarks/results/ratio_bounds.json).
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
from collections import defaultdict

import numpy as np

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


def query_geometry(ds, positions: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) squared distance ``sq_a``, ``sq_b`` and dot product ``dot_a``, ``dot_b`` between the
    query's position and marker a's, b's (marker a: the one at gap ``marker_distances[:, 0]``)."""
    q = ds.query_positions.numpy()
    tagged = ds.positions.numpy()  # (N, 2), sorted
    first_is_a = np.abs(tagged[:, 0] - q) == ds.marker_distances[:, 0].numpy()
    where = {
        "a": np.where(first_is_a, tagged[:, 0], tagged[:, 1]),
        "b": np.where(first_is_a, tagged[:, 1], tagged[:, 0]),
    }
    pq = positions[q]
    out = {}
    for name, pos in where.items():
        out[f"sq_{name}"] = ((pq - positions[pos]) ** 2).sum(1)
        out[f"dot_{name}"] = (pq * positions[pos]).sum(1)
    return out


def power_law_log_ratio(geo: dict[str, np.ndarray], c_a: float, c_b: float, exponent: float) -> np.ndarray:
    """``log(w_a / w_b)`` of ``(1 + z)^-exponent`` with ``z = sqrt(c + sq)`` (bandwidth 1, kappa 1)."""
    return -exponent * (np.log1p(np.sqrt(c_a + geo["sq_a"])) - np.log1p(np.sqrt(c_b + geo["sq_b"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="multiscale-ratio-brownian-1layer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset override")
    parser.add_argument("--alpha", type=float, default=1.2, help="the power law's alpha (< 2)")
    parser.add_argument("--out", default="benchmarks/results/ratio_bounds.json")
    args = parser.parse_args()
    preset = apply_overrides(get_preset(args.preset), args.set)
    task_args = preset["data"]["task_args"]
    if task_args.get("kind") != "ratio":
        parser.error(f"--preset {args.preset} is not a ratio task (kind={task_args.get('kind')!r})")
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
    atomic_write_json(args.out, {
        "preset": args.preset, "overrides": args.set, "alpha": args.alpha, "head_dim": head_dim,
        "task_args": task_args, "python": platform.python_version(), "rows": rows,
    })  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
