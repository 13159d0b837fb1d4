"""experiments/ratio_bounds.py: its threshold rule, its geometry and its kernels are the library's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from levyattn.data import make_multiscale_task
from levyattn.kernels import log_phi_from_sq
from levyattn.models.common import brownian_positions

_PATH = Path(__file__).resolve().parents[2] / "experiments" / "ratio_bounds.py"
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


@torch.no_grad()
def test_trained_readouts_read_the_models_own_attention():
    # The preset's model (post-LN, qk_share, orthogonal, rescale off, bandwidth 1) attends with
    # log K(i, j) = -(d + alpha) log(1 + ||x_i - x_j||) on x = token embedding + position: the
    # orthogonal projection keeps distances. Each row is normalised over the other tokens
    # (qk_share excludes the self-pair, docs/operator.md).
    from levyattn.training.tasks.classification import PRESETS, ClassificationTask

    preset = PRESETS["multiscale-ratio-brownian-1layer"]
    task_args = {**preset["data"]["task_args"], "n_train": 40, "n_test": 8}
    task = ClassificationTask({**preset, "data": {**preset["data"], "task_args": task_args}})
    train, _ = task.datasets()
    model = task.build_model().eval()
    pos_a, pos_b = (p[:30] for p in bench.marker_positions(train))
    q, rows = train.query_positions[:30], torch.arange(30)

    # without content the query's score is the untrained readout's power law with no content terms
    model.token_embedding.weight.zero_()
    geo = bench.query_geometry(train, brownian_positions(64, 32).double().numpy())
    want = bench.power_law_log_ratio(geo, 0.0, 0.0, 32 + 1.2)[:30]
    np.testing.assert_allclose(bench.trained_log_ratios(model, train, 30)[0]["query"], want, rtol=1e-3, atol=1e-3)

    # With content, and positions shrunk so that no row is its own token alone, the marker rows'
    # normalisers differ and the two scores part: each must be the one its name says.
    torch.nn.init.normal_(model.token_embedding.weight, std=0.003)
    model.position_embedding.mul_(0.01)
    scores, predicted = bench.trained_log_ratios(model, train, 30, batch=16)
    assert scores["query"].shape == scores["markers"].shape == (30,)
    np.testing.assert_array_equal(predicted, model(train.input_ids[:30]).logits.argmax(-1).numpy())
    x = model.token_embedding(train.input_ids[:30]).double() + model.position_embedding.double()  # (30, 64, 32)
    log_k = -(32 + 1.2) * torch.log1p(torch.cdist(x, x))
    log_k.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
    log_w = log_k - log_k.logsumexp(-1, keepdim=True)  # (30, 64, 64)
    want_query = (log_w[rows, q, pos_a] - log_w[rows, q, pos_b]).numpy()
    want_markers = (log_w[rows, pos_a, q] - log_w[rows, pos_b, q]).numpy()
    assert np.abs(want_query - want_markers).max() > 0.1
    np.testing.assert_allclose(scores["query"], want_query, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores["markers"], want_markers, rtol=1e-3, atol=1e-3)
