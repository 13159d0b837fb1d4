"""experiments/synthetic_alpha.py: its paired tests of the per-seed differences."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "experiments" / "synthetic_alpha.py"
_spec = importlib.util.spec_from_file_location("synthetic_alpha_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_paired_tests_on_known_differences():
    # 6 of 7 positive, one tiny negative: the sign test is P(Binomial(7, 1/2) >= 6) = 8/128
    diffs = [0.099, 0.0865, 0.0175, -0.0015, 0.102, 0.0485, 0.0125]
    p = bench.paired_tests(diffs)
    assert p["sign_p"] == pytest.approx(8 / 128)
    assert p["paired_t_p"] == pytest.approx(0.0100, abs=5e-4)
    assert p["wilcoxon_p"] == pytest.approx(2 / 128)  # exact: only the smallest rank is negative
    behind = bench.paired_tests([-d for d in diffs])
    assert behind["sign_p"] > 0.9 and behind["paired_t_p"] > 0.9 and behind["wilcoxon_p"] > 0.9


def test_paired_tests_need_three_seeds():
    assert all(math.isnan(v) for v in bench.paired_tests([0.1, 0.2]).values())
    assert all(math.isnan(v) for v in bench.paired_tests([0.0, 0.0, 0.0]).values())


def test_the_target_is_never_met_on_one_seed():
    from levyattn.training.sweep import summarise

    def run(alpha, seed, accuracy):
        return {"attention": "fna", "alpha": alpha, "seed": seed, "accuracy": accuracy, "spectral_gap": 0.1,
                "params": 10, "train_time_s": 1.0}

    # One seed: the sweep gave std 0.0, so any lead at all "met" the rule.
    best, other = summarise([run(1.2, 0, 0.91), run(2.0, 0, 0.90)])
    assert best["accuracy_std"] is None and bench.target_rule(best, other) == {
        "margin": pytest.approx(0.01), "spread": None, "met": False}
    best, other = summarise([run(1.2, s, a) for s, a in ((0, 0.91), (1, 0.93))]
                            + [run(2.0, s, a) for s, a in ((0, 0.90), (1, 0.90))])
    rule = bench.target_rule(best, other)
    # two seeds: +0.02 over the larger sample std, 0.0141 (ddof = 1)
    assert rule["spread"] == pytest.approx(0.02 / 2**0.5) and rule["met"] is True


def test_buckets_over_one_seed_have_no_spread():
    rows = [{"name": "fna-a1.2-s0", "attention": "fna", "alpha": 1.2, "seed": 0, "accuracy": 0.9, "near_1_2": 0.95}]
    (one,) = bench.summarize_by_bucket(rows)
    assert one["accuracy_mean"] == pytest.approx(0.9) and one["accuracy_std"] is None  # was 0.0: "0.900 ± 0.000"
    two = bench.summarize_by_bucket(rows + [dict(rows[0], seed=1, accuracy=0.8, near_1_2=0.85)])[0]
    assert two["accuracy_std"] == pytest.approx(0.1 / 2**0.5)  # the sample std, ddof = 1
