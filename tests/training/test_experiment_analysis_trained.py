"""experiments/analysis_trained.py: its spread over seeds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "experiments" / "analysis_trained.py"
_spec = importlib.util.spec_from_file_location("analysis_trained_experiment", _PATH)
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)


def test_the_spread_is_the_sample_std_and_one_seed_has_none():
    # softmax on multiscale, seeds 0 and 1: the population std gave 0.088, the sample std is 0.1245
    mean, std = experiment.mean_std([0.823, 0.999])
    assert mean == pytest.approx(0.911) and std == pytest.approx(0.176 / 2**0.5)
    assert experiment.mean_std([0.9, None]) == (0.9, None) and experiment.fmt(0.9, None) == "0.900"
    assert experiment.mean_std([None]) == (None, None) and experiment.fmt(None, None) == "n/a"
