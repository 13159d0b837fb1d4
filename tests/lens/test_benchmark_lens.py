"""benchmarks/lens.py: the published tool's procedure, the time-to-CI race and the CI study."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "lens.py"
_spec = importlib.util.spec_from_file_location("lens_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

DIST = [10, 30, 60, 120]


def noisy_power_law(gamma: float, sigma: float, paired: bool = True):
    """A procedure whose prompts give d^-gamma times log-normal noise; its mean curve has exactly slope -gamma."""
    calls = []

    def run(seed: int, n: int):
        calls.append((seed, n))
        rng = np.random.default_rng(seed)
        d = np.asarray(DIST, dtype=float)
        return d**-gamma * np.exp(sigma * rng.standard_normal((n, d.size))), n, paired

    return run, calls


def test_published_tool_reads_the_values_of_per_distance(llama):
    impl = llama.config._attn_implementation
    llama.set_attn_implementation("eager")  # the published tool needs weights from the model as given
    try:
        tool_table, tool_passes, tool_paired = bench.published_tool(llama, [30, 60], 1000, 1999)(42, 3)
        lib_table, lib_passes, lib_paired = bench.in_library(llama, [30, 60], "per-distance", 3)(42, 3)
        nested_table = bench.in_library(llama, [30, 60], "per-distance nested", 3)(42, 3)[0]
        fwd = bench.forward_times(llama, 60, 1000, 1999, repeats=1)
    finally:
        llama.set_attn_implementation(impl)
    assert tool_table.shape == (3, 2) and np.all(tool_table > 0)
    np.testing.assert_allclose(tool_table, lib_table, rtol=1e-5)
    assert (tool_passes, lib_passes) == (6, 2) and not tool_paired and not lib_paired
    # the published stream restarts the generator per distance: prompt 0 is shared, prompt 1 at d = 30 is not
    np.testing.assert_allclose(nested_table[0], lib_table[0], rtol=1e-5)
    assert not np.isclose(nested_table[1, 0], lib_table[1, 0])
    assert set(fwd) == {"whole_lm", "backbone"} and all(0 < t < 60 for t in fwd.values())


def test_in_library_rejects_unknown_method(llama):
    with pytest.raises(ValueError, match="method.*'fast'"):
        bench.in_library(llama, DIST, "fast", 1)


def test_time_to_ci_stops_at_first_chunk_under_target():
    proc, calls = noisy_power_law(0.7, 0.3)
    kw = dict(chunk=2, n_boot=100, seed_base=7)
    done = bench.time_to_ci(proc, DIST, target=10.0, min_prompts=2, max_prompts=20, **kw)
    assert done["reached"] and done["prompts"] == 2 and done["passes"] == 2 and calls == [(7, 2)]
    assert done["ci"][0] <= done["gamma"] <= done["ci"][1]
    proc, calls = noisy_power_law(0.7, 0.3)
    held = bench.time_to_ci(proc, DIST, target=10.0, min_prompts=5, max_prompts=20, **kw)  # no interval before 5
    assert held["reached"] and held["prompts"] == 6 and calls == [(7, 2), (8, 2), (9, 2)]
    proc, calls = noisy_power_law(0.7, 0.3)
    capped = bench.time_to_ci(proc, DIST, target=0.0, min_prompts=2, max_prompts=6, **kw)
    assert not capped["reached"] and capped["prompts"] == 6 and calls == [(7, 2), (8, 2), (9, 2)]
    assert capped["half_width"] > 0 and abs(capped["gamma"] - 0.7) < 0.3


def test_fastest_batch_takes_least_time_per_prompt():
    def make(batch: int):
        def run(seed: int, n: int):
            time.sleep(0.01 * n if batch != 2 else 0.0)  # batch 2 is the only one that costs nothing
            return np.ones((n, 1)), n, True

        return run

    best, times = bench.fastest_batch(make, chunk=4, n=3)
    assert best == 2 and sorted(times) == [1, 2, 4] and times[2] < times[1] and times[2] < times[4]


def test_ci_study_half_width_spread_and_coverage():
    paired, _ = noisy_power_law(0.7, 0.4)
    unpaired, _ = noisy_power_law(0.7, 0.4, paired=False)
    rows = bench.ci_study({"a": paired, "b": unpaired}, DIST, [12], repeats=40, ref_gamma=0.7, n_boot=200)
    assert [(r["procedure"], r["prompts"], r["paired"]) for r in rows] == [("a", 12, True), ("b", 12, False)]
    for r in rows:
        assert 0.8 <= r["coverage"] <= 1.0 and abs(r["gamma_mean"] - 0.7) < 0.05
        assert 0.5 < r["half_width_mean"] / r["calibrated_half_width"] < 2.0  # the bootstrap tracks the real spread
    far = bench.ci_study({"a": paired}, DIST, [12], repeats=10, ref_gamma=5.0, n_boot=100)
    assert far[0]["coverage"] == 0.0
