"""Fits: the published numbers from the published A(d) tables, hand-computed values, laws, bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn.lens import bootstrap_gamma, choose_model, fit_exponential, fit_power_law

# Published A(d) tables (mean_across_seeds) and fits, from data/e4_gamma/*_random.json of
# github.com/karlesmarin/tafagent (Apache-2.0): 150 prompts per distance, seeds 42, 123, 7.
D = [10, 20, 30, 50, 100, 200, 500, 1000, 2000]
PUBLISHED = {
    "EleutherAI/pythia-160m": {
        "values": [0.010829462509912749, 0.009873490159192847, 0.003808915811306279, 0.003134424632622136,
                   0.001589946753811091, 0.0009230124831406607, 0.0003505013234017598, 0.00015388178632242167,
                   5.142585230411594e-05],
        "power": (1.0171452847779678, -1.8268598516498322, 0.981723, 7),
        "exp": (0.002070284850238622, -6.192254167723398, 0.87649, 7),
        "delta_r2": 0.1052,
    },
    "EleutherAI/pythia-14m": {
        "values": [0.010373582980052257, 0.006793614017466704, 0.005060315049162858, 0.0042915507254656406,
                   0.0019918971036935952, 0.0011028067811053512, 0.00045950785397306186, 0.00012169795030211442,
                   0.00010627185478203357],
        "power": (1.003714187534367, -1.6477058895472607, 0.977698, 7),
        "exp": (0.0019252473876952617, -6.020695902400171, 0.775214, 7),
        "delta_r2": 0.2025,
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_tables_give_published_fits(name):
    t = PUBLISHED[name]
    p = fit_power_law(D, t["values"], d_min=30)
    e = fit_exponential(D, t["values"], d_min=30)
    assert p.gamma == pytest.approx(t["power"][0], abs=1e-12)
    assert p.log_A == pytest.approx(t["power"][1], abs=1e-12)
    assert round(p.r2, 6) == t["power"][2]  # published R^2 is rounded to 6 digits
    assert p.n_points == t["power"][3]
    assert e.lam == pytest.approx(t["exp"][0], abs=1e-15)
    assert e.log_A == pytest.approx(t["exp"][1], abs=1e-12)
    assert round(e.r2, 6) == t["exp"][2]
    assert round(choose_model(p, e).delta_r2, 4) == t["delta_r2"]


def test_hand_computed_power_law():
    # x = ln d equally spaced by h = ln 10 around ln 300; y = (-1, -3, -4)
    d = [30, 300, 3000]
    v = np.exp([-1.0, -3.0, -4.0])
    p = fit_power_law(d, v, d_min=30)
    h = math.log(10)
    gamma = 1.5 / h  # slope (y3 - y1) / (2h) = -1.5 / h
    assert p.gamma == pytest.approx(gamma, rel=1e-12)
    assert p.log_A == pytest.approx(-8 / 3 + gamma * math.log(300), rel=1e-12)
    assert p.r2 == pytest.approx(4.5 / (42 / 9), rel=1e-12)  # SS_reg / SS_tot = 40.5 / 42
    assert p.n_points == 3


def test_hand_computed_exponential_and_filtering():
    # y = 2 - 0.01 d exactly at d = 100, 200, 300; d = 10 (< d_min), a zero and a NaN are left out
    d = [10, 100, 150, 200, 250, 300]
    v = [5.0, math.exp(1.0), 0.0, math.exp(0.0), float("nan"), math.exp(-1.0)]
    e = fit_exponential(d, v, d_min=30)
    assert (e.lam, e.log_A, e.r2, e.n_points) == (pytest.approx(0.01), pytest.approx(2.0), pytest.approx(1.0), 3)


@settings(max_examples=40, deadline=None)
@given(gamma=st.floats(0.05, 3.0), log_a=st.floats(-12.0, 0.0),
       ds=st.lists(st.integers(30, 100_000), min_size=2, max_size=12, unique=True))
def test_exact_power_law_recovered(gamma, log_a, ds):
    v = np.exp(log_a - gamma * np.log(ds))
    p = fit_power_law(ds, v)
    assert p.gamma == pytest.approx(gamma, abs=1e-8)
    assert p.log_A == pytest.approx(log_a, abs=1e-6)


def test_model_choice_picks_the_true_law():
    d = np.array([30, 50, 100, 200, 500, 1000, 2000], dtype=float)
    rng = np.random.default_rng(0)
    pw = np.exp(-1.0 - 0.9 * np.log(d) + 0.01 * rng.standard_normal(d.size))
    ex = np.exp(-3.0 - 0.002 * d + 0.01 * rng.standard_normal(d.size))
    c_pw = choose_model(fit_power_law(d, pw), fit_exponential(d, pw))
    c_ex = choose_model(fit_power_law(d, ex), fit_exponential(d, ex))
    assert c_pw.choice == "power_law" and c_pw.delta_r2 > 0 and c_pw.weight_power_law > 0.99
    assert c_ex.choice == "exponential" and c_ex.delta_r2 < 0 and c_ex.weight_power_law < 0.01


@pytest.mark.parametrize("paired", [True, False])
def test_bootstrap_ci_covers_truth(paired):
    rng = np.random.default_rng(1)
    d = np.array([30, 60, 120, 240, 480, 960], dtype=float)
    true = np.exp(-2.0 - 0.8 * np.log(d))
    prompts = true[None, :] * rng.lognormal(0.0, 0.3, size=(200, d.size))
    boot = bootstrap_gamma(prompts, d, n_boot=400, paired=paired, seed=3)
    assert boot.lo < 0.8 < boot.hi and boot.hi - boot.lo < 0.1 and boot.gammas.shape == (400,)
    assert boot.n_valid == boot.n_boot == 400 and boot.level == 0.95
    # fewer prompts -> wider interval
    fewer = bootstrap_gamma(prompts[:20], d, n_boot=400, paired=paired, seed=3)
    assert fewer.hi - fewer.lo > boot.hi - boot.lo


def _far_weight_in_few_prompts(n_positive: int) -> tuple[np.ndarray, np.ndarray]:
    """6 prompts of A(d) = d^-0.8 (lognormal noise); only the first ``n_positive`` have weight past d = 30."""
    d = np.array([30.0, 60.0, 120.0])
    pv = (d**-0.8)[None, :] * np.random.default_rng(0).lognormal(0.0, 0.2, size=(6, 3))
    pv[n_positive:, 1:] = 0.0
    return d, pv


def test_bootstrap_refuses_when_invalid_resamples_fill_a_tail():
    # one prompt of six carries the far weight: (5/6)^6 = 33% of the resamples have A = 0 at d = 60 and 120
    d, pv = _far_weight_in_few_prompts(1)
    with pytest.raises(ValueError, match=r"640 of 2000 resampled curves were zero or missing .* 2.5% tail"):
        bootstrap_gamma(pv, d, n_boot=2000, seed=0)


def test_bootstrap_widens_and_warns_for_a_few_invalid_resamples():
    # three prompts of six carry the far weight: (1/2)^6 = 1.6% of the resamples are invalid, below the 2.5% tail
    d, pv = _far_weight_in_few_prompts(3)
    with pytest.warns(RuntimeWarning, match="30 of 2000 bootstrap resamples"):
        boot = bootstrap_gamma(pv, d, n_boot=2000, seed=0)
    assert (boot.n_boot, boot.n_valid, boot.n_invalid) == (2000, 1970, 30)
    assert np.isnan(boot.gammas).sum() == 30
    valid = boot.gammas[np.isfinite(boot.gammas)]
    # each end counts the 30 at the side that widens it: the 2.5% / 97.5% points of all 2000, not of the 1970
    assert boot.lo == pytest.approx(np.quantile(np.r_[np.full(30, -np.inf), valid], 0.025))
    assert boot.hi == pytest.approx(np.quantile(np.r_[valid, np.full(30, np.inf)], 0.975))
    assert boot.lo < np.quantile(valid, 0.025) and boot.hi > np.quantile(valid, 0.975)


def test_bootstrap_fits_every_resample_on_the_points_of_the_whole_fit():
    # one prompt of six has weight at d = 240: a resample without it must not be fitted on 30..120 alone
    d = np.array([30.0, 60.0, 120.0, 240.0])
    pv = (d**-0.8)[None, :] * np.random.default_rng(0).lognormal(0.0, 0.2, size=(6, 4))
    pv[1:, 3] = 0.0
    with pytest.raises(ValueError, match=r"of 2000 resampled curves were zero or missing"):
        bootstrap_gamma(pv, d, n_boot=2000, seed=0)


@pytest.mark.parametrize(
    "args, match",
    [
        (([30], [0.1]), "at least 2"),
        (([30, 60], [0.1]), "same length"),
        (([10, 20], [0.1, 0.05]), "d_min=30"),
        (([30, 60], [-1.0, 0.0]), "finite positive"),
        (([0, 60], [0.1, 0.2]), "positive and finite"),
        (([[30, 60]], [[0.1, 0.2]]), "one-dimensional"),
    ],
)
def test_bad_fit_input(args, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(*args)
    with pytest.raises(ValueError, match=match):
        fit_exponential(*args)


def test_bad_bootstrap_input():
    d = [30, 60, 120]
    with pytest.raises(ValueError, match="shape"):
        bootstrap_gamma(np.ones((5, 2)), d)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_gamma(np.ones((5, 3)), d, n_boot=3)
    with pytest.raises(ValueError, match="2 prompts"):
        bootstrap_gamma(np.ones((1, 3)), d)
    with pytest.raises(ValueError, match="level"):
        bootstrap_gamma(np.ones((5, 3)), d, level=1.5)
    with pytest.raises(ValueError, match="d_min"):
        fit_power_law(d, [1, 2, 3], d_min=-1)


def _noisy_measurement(seed: int, window: int | None = None):
    """4 prompts whose A(d) = d^-1 times lognormal noise (sigma 1), one seed, one layer and head;
    zero past ``window`` (a sliding window)."""
    from levyattn.lens import DecayMeasurement

    d = np.array([30, 60, 120, 240])
    pv = (d ** -1.0)[None, :] * np.random.default_rng(seed).lognormal(0.0, 1.0, size=(4, d.size))
    if window is not None:
        pv[:, d > window] = 0.0
    n = np.full(d.size, 4)
    return DecayMeasurement(
        model_name="noisy", protocol="published", passes="one", causal=True, distances=d, seeds=(42,), n_prompts=4,
        prompt_layer=pv[None, :, None, :], layer_head=pv.mean(0)[None, None, :], layer_head_sd=np.zeros((1, 1, 4)),
        sample_counts=n, pair_counts=n, paired=True, n_passes=4, n_tokens=0, wall_time_s=0.0,
    )  # fmt: skip


def test_a_gamma_outside_its_own_interval_is_refused():
    from levyattn.lens import analyze_decay

    # seed 534: the 50% percentile interval of the skewed bootstrap misses the fitted gamma by 0.0039
    with pytest.raises(ValueError, match=r"50% bootstrap interval \[.*\] of gamma does not contain the fitted gamma"):
        analyze_decay(_noisy_measurement(534), n_boot=200, level=0.5)
    # seed 412: the interval's lower end equals gamma up to rounding (7e-16 apart): kept
    res = analyze_decay(_noisy_measurement(412), n_boot=200, level=0.5)
    assert res.gamma_ci[0] == pytest.approx(res.power.gamma, abs=1e-12) and res.gamma_ci[1] > res.power.gamma


@pytest.mark.parametrize("level, t", [(0.9, 2.3533634348018233), (0.95, 3.1824463052837078)])  # Student t, 3 dof
def test_per_distance_intervals_take_the_run_level(level, t, tmp_path):
    from levyattn.lens import analyze_decay, write_lens_outputs

    m = _noisy_measurement(412)
    res = analyze_decay(m, n_boot=200, level=level)
    pv = m.flat_prompt_values()  # 4 prompts
    half = t * pv.std(axis=0, ddof=1) / np.sqrt(4)
    np.testing.assert_allclose(res.point_ci, np.stack([pv.mean(0) - half, pv.mean(0) + half], axis=1), rtol=1e-12)
    page = write_lens_outputs(res, tmp_path, plots=False)["html"].read_text()
    pct = f"{level * 100:g}%"
    assert f"<th>{pct} lo</th><th>{pct} hi</th>" in page and page.count("% lo") == 1


def test_distances_left_out_of_the_fit_are_said(tmp_path):
    """A(d) = 0 past a sliding window cannot enter the log fit: the report must not call those distances fitted."""
    from levyattn.lens import analyze_decay, write_lens_outputs
    from levyattn.lens.report import summary_rows

    with pytest.warns(RuntimeWarning, match=r"zero or missing at the distances \[120, 240\] >= d_min=30: .* other 2"):
        res = analyze_decay(_noisy_measurement(412, window=100), n_boot=200)
    assert res.power.n_points == 2 and res.left_out == [120, 240] and res.fitted.tolist() == [True, True, False, False]
    paths = write_lens_outputs(res, tmp_path, plots=False)
    data = json.loads(paths["json"].read_text())
    assert data["fitted_distances"] == [30, 60] and data["left_out_distances"] == [120, 240]
    page = paths["html"].read_text()
    fitted_column = re.findall(r"<tr><td class='num'>(\d+)</td>.*?<td>(yes|no)</td></tr>", page)
    assert fitted_column == [("30", "yes"), ("60", "yes"), ("120", "no"), ("240", "no")]
    assert "left out: 120, 240" in dict(summary_rows(res))["distances"]


def test_the_summary_names_the_level_as_given():
    from levyattn.lens import analyze_decay
    from levyattn.lens.report import summary_rows

    rows = dict(summary_rows(analyze_decay(_noisy_measurement(412), n_boot=200, level=0.975)))
    assert "gamma 97.5% CI" in rows  # rounded to a whole percent it read "98%" (and 0.999 read "100%")
