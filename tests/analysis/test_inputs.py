"""Bad input gives errors that name the failed check; files load in every supported format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from levyattn.analysis import attention_summary, mixing_time, path_lengths, row_entropy, spectral_gap
from levyattn.analysis.io import load_attention
from levyattn.cli import main

U = np.full((4, 4), 0.25)


@pytest.mark.parametrize(
    "P, match",
    [
        (np.ones((3, 4)) / 4, r"square"),
        (np.ones(4) / 4, r"shape"),
        (np.zeros((0, 0)), r"empty"),
        (np.where(np.eye(4, dtype=bool), np.nan, U), r"finite"),
        (np.where(np.eye(4, dtype=bool), np.inf, U), r"finite"),
        (
            U + np.diag([0.5, 0, 0, 0]) - np.diag([0, 0, 0, 0.5]) * 0 - np.array([[0, 0.5, 0, 0]] + [[0] * 4] * 3),
            r"non-negative",
        ),
        (U * 1.01, r"rows sum to 1"),
    ],
)
@pytest.mark.parametrize("fn", [spectral_gap, mixing_time, path_lengths, row_entropy])
def test_bad_matrices(P, match, fn):
    with pytest.raises(ValueError, match=match):
        fn(P)


def test_types_tolerance_and_masks():
    with pytest.raises(TypeError, match="torch.Tensor or a numpy.ndarray"):
        spectral_gap([[1.0]])
    with pytest.raises(TypeError, match="real"):
        spectral_gap(torch.eye(3, dtype=torch.complex64))
    assert spectral_gap(U * (1 + 5e-4)) == pytest.approx(1.0)  # inside the default atol
    with pytest.raises(ValueError, match="atol=1e-05"):
        spectral_gap(U * (1 + 5e-4), atol=1e-5)
    assert spectral_gap(torch.from_numpy(U * 1.004).to(torch.bfloat16)) == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(ValueError, match="mask or lengths"):
        spectral_gap(U, np.ones(4, bool), lengths=np.array(2))
    with pytest.raises(TypeError, match="boolean"):
        spectral_gap(U, np.ones(4))
    with pytest.raises(ValueError, match="no valid token"):
        spectral_gap(U, np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"lengths must lie"):
        spectral_gap(U, lengths=np.array(9))
    P = np.array([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4]])
    with pytest.raises(ValueError, match="all its mass on masked"):
        spectral_gap(P, np.array([True, True, False]))
    padded = np.vstack([np.hstack([U, np.zeros((4, 1))]), np.full((1, 5), np.nan)])
    assert spectral_gap(padded, np.array([True] * 4 + [False])) == pytest.approx(1.0)  # padding never checked


def attention(B=2, H=2, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, H, N, N, generator=g) * 2, -1)


def test_summary_is_json_and_consistent():
    w = attention()
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    out = attention_summary([w, w.flip(-1)], mask=mask)
    text = json.dumps(out, allow_nan=False)
    assert len(out["records"]) == 2 * 2 * 2 and {r["layer"] for r in out["records"]} == {"layer0", "layer1"}
    rec = out["records"][3]  # layer0, batch 1, head 1
    assert (rec["layer"], rec["batch"], rec["head"], rec["n_valid"]) == ("layer0", 1, 1, 5)
    assert rec["spectral_gap"] == pytest.approx(spectral_gap(w[1, 1, :5, :5] / w[1, 1, :5, :5].sum(-1, keepdim=True)))
    assert len(out["heads"]) == 4 and "NaN" not in text and "Infinity" not in text


def test_loaders_and_cli(tmp_path):
    w = attention(seed=1)
    torch.save({"layer0": w, "layer1": w[0]}, tmp_path / "a.pt")
    torch.save((w, w), tmp_path / "hf.pt")
    np.save(tmp_path / "a.npy", w.numpy())
    from safetensors.torch import save_file

    save_file({"layer0": w.to(torch.bfloat16).contiguous()}, str(tmp_path / "a.safetensors"))
    assert set(load_attention(tmp_path / "a.pt")) == {"layer0", "layer1"}
    assert set(load_attention(tmp_path / "hf.pt")) == {"layer0", "layer1"}
    assert load_attention(tmp_path / "a.npy")["attention"].shape == (2, 2, 7, 7)
    assert load_attention(tmp_path / "a.safetensors", key="layer0")["layer0"].dtype == np.float64
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_attention(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_attention(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "x.txt").write_text("1")
        load_attention(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no entry 'nope'"):
        load_attention(tmp_path / "a.pt", key="nope")

    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "a.pt"), "--out", str(out), "--head", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["records"]) == 2 * 2 + 1 * 2  # layer0 (B, H, N, N): 2 x 2; layer1 (H, N, N): 1 x 2
    assert main(["analyze", str(tmp_path / "hf.pt"), "--out", str(out), "--lengths", "7,5", "--layer", "layer1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["n_valid"] for r in summary["records"][:4]] == [7, 7, 5, 5]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 3 and "Per layer and head" in html
    # the first analysis's per-layer figures are gone: they stayed beside this report (6 of 9 PNGs)
    assert sorted(p.name for p in out.glob("*.png")) == ["attention.png", "diffusion_map.png", "spectrum.png"]
    assert main(["analyze", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "o2")]) == 0
    assert main(["analyze", str(tmp_path / "a.npy"), "--out", str(tmp_path / "o3"), "--layer", "zz"]) == 2


def test_rows_accepted_within_atol_are_renormalised():
    """bfloat16 attention passes the row check with sums 1 +- 2e-3; the analyses must see the
    same walk as its rows renormalised in float64, not a sub- or super-stochastic one."""
    i = torch.arange(64, dtype=torch.float32)
    P = torch.softmax(-((i[:, None] - i[None, :]) ** 2) / 4.0, -1).to(torch.bfloat16)
    sums = P.double().sum(-1)
    assert (sums - 1).abs().max() > 1e-3
    exact = (P.double() / sums[:, None]).numpy()
    assert mixing_time(P) == mixing_time(exact)
    assert spectral_gap(P) == pytest.approx(spectral_gap(exact), rel=1e-9)
    assert row_entropy(P) == pytest.approx(row_entropy(exact), rel=1e-12)


def test_batch_masks_align_with_the_batch_not_the_heads():
    """A (B, N) mask or (B,) lengths for (B, H, N, N) with B == H was aligned with the heads by
    numpy broadcasting (matrix [0, 1] measured with batch element 1's padding): refused now."""
    rng = np.random.default_rng(0)
    A = rng.random((2, 2, 6, 6)) ** 4 + 1e-3
    P = A / A.sum(-1, keepdims=True)
    mask = np.array([[True] * 6, [True] * 3 + [False] * 3])
    for fn in (spectral_gap, mixing_time, path_lengths, row_entropy):
        with pytest.raises(ValueError, match=r"mask of shape \(2, 6\) is ambiguous.*\(B, 1, N\)"):
            fn(P, mask)
        with pytest.raises(ValueError, match=r"lengths of shape \(2,\) is ambiguous.*\(B, 1\)"):
            fn(P, lengths=np.array([6, 3]))
    gap = spectral_gap(P, mask[:, None, :])
    by_lengths = spectral_gap(P, lengths=np.array([[6], [3]]))
    for b in range(2):
        idx = np.flatnonzero(mask[b])
        for h in range(2):
            sub = P[b, h][np.ix_(idx, idx)]
            sub = sub / sub.sum(1, keepdims=True)
            expected = 1 - np.sort(np.abs(np.linalg.eigvals(sub)))[-2]
            assert gap[b, h] == pytest.approx(expected, abs=1e-12)
            assert by_lengths[b, h] == pytest.approx(expected, abs=1e-12)
    assert spectral_gap(P, mask[1]) == pytest.approx(spectral_gap(P, mask[1][None, None]))  # (N,) is shared


def test_summary_means_are_infinite_when_a_record_is():
    """A head that never mixes was left out of the means (one periodic head of four: the layer's
    mean mixing time read 2.0, the other three heads' value); the mean is null (infinite) now."""
    n = 6
    cycle = np.roll(np.eye(n), 1, 1)
    lazy_uniform = np.full((n, n), 0.5 / n) + 0.5 * np.eye(n)
    out = attention_summary(np.stack([cycle, lazy_uniform, lazy_uniform, lazy_uniform])[None])
    assert [r["mixing_steps"] for r in out["records"]] == [None, 2.0, 2.0, 2.0]
    assert out["layers"][0]["mixing_steps"] is None and out["layers"][0]["n_infinite"]["mixing_steps"] == 1
    assert out["heads"][1]["mixing_steps"] == 2.0 and "mixing_steps" not in out["heads"][1]["n_infinite"]
    # Off-diagonal 1/12 < 1/n: no hop edge, so every lazy head's hop distances are infinite.
    assert out["layers"][0]["mean_hops"] is None and out["layers"][0]["n_infinite"]["mean_hops"] == 3
    assert out["layers"][0]["spectral_gap"] == pytest.approx(np.mean([r["spectral_gap"] for r in out["records"]]))
    skipped = attention_summary(np.stack([lazy_uniform] * 2)[None], mixing=False)
    assert skipped["layers"][0]["mixing_steps"] is None and "mixing_steps" not in skipped["layers"][0]["n_infinite"]
