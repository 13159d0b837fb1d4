"""benchmarks/ratio_bounds.py: its threshold rule, its geometry and its kernels are the library's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from levyattn.data import make_multiscale_task
from levyattn.kernels import log_phi_from_sq
from levyattn.models.common import brownian_positions

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ratio_bounds.py"
_spec = importlib.util.spec_from_file_location("ratio_bounds_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_threshold_rule_finds_the_separating_cut_on_either_side():
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.7])
    y = np.array([1, 1, 1, 0, 0, 0])
    cut, side = bench.threshold_rule(score, y)
    assert 0.4 < cut < 0.7 and side == 0
    assert bench.threshold_accuracy(score, y, np.array([0.0, 1.0]), np.array([1, 0])) == (1.0, 1.0)
    # negated scores: the cut moves below zero, so both test scores fall on the label-1 side
    assert bench.threshold_accuracy(-score, y, np.array([0.0, 1.0]), np.array([1, 0])) == (1.0, 0.5)


def test_lookup_accuracy_is_the_majority_label_per_key():
    keys, y = np.array([1, 1, 1, 2, 2]), np.array([1, 1, 0, 0, 0])
    assert bench.lookup_accuracy(keys, y, np.array([1, 2, 3]), np.array([1, 1, 0])) == (0.8, 2 / 3)


def test_geometry_and_kernels_match_the_positions_and_the_library_kernel():
    train, _ = make_multiscale_task(200, 1, seq_len=64, d_min=4, d_max=40, kind="ratio", n_values=2, n_noise=1,
                                    distractor_rate=0.0)  # fmt: skip
    positions = brownian_positions(64, 32).double()
    geo = bench.query_geometry(train, positions.numpy())
    ids, q = train.input_ids, train.query_positions
    for j, name in enumerate(("a", "b")):
        marker = (ids == 1 + j).float().argmax(1)  # n_values=2: marker a is T0, marker b is T1
        assert torch.equal((marker - q).abs(), train.marker_distances[:, j])
        sq = ((positions[q] - positions[marker]) ** 2).sum(1)
        np.testing.assert_allclose(geo[f"sq_{name}"], sq.numpy(), rtol=1e-12)
        np.testing.assert_allclose(geo[f"dot_{name}"], (positions[q] * positions[marker]).sum(1).numpy(), rtol=1e-12)
    # the power law here is log Phi of the library at alpha 1.2, head dim 32, bandwidth 1, no rescale
    sq_a, sq_b = torch.from_numpy(geo["sq_a"]), torch.from_numpy(geo["sq_b"])
    lib = [log_phi_from_sq(s + 1.0, alpha=1.2, bandwidth=1.0, d_intrinsic=32.0) for s in (sq_a, sq_b)]
    np.testing.assert_allclose(bench.power_law_log_ratio(geo, 1.0, 1.0, 32 + 1.2), (lib[0] - lib[1]).numpy(),
                               rtol=1e-10)  # fmt: skip
    # and the Gaussian's log ratio is sq_b - sq_a, the quantity the script thresholds
    gauss = [log_phi_from_sq(s, alpha=2.0, bandwidth=1.0, d_intrinsic=32.0) for s in (sq_a, sq_b)]
    np.testing.assert_allclose((gauss[0] - gauss[1]).numpy(), geo["sq_b"] - geo["sq_a"], rtol=1e-10)
