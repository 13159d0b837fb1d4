"""benchmarks/lens_scale.py: the peak-RSS sampler and the model configs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "lens_scale.py"
_spec = importlib.util.spec_from_file_location("lens_scale_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


_TRANSIENT = f"""
import importlib.util, time, torch
spec = importlib.util.spec_from_file_location("lens_scale_benchmark", {str(_PATH)!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
with bench.PeakRSS(interval=0.001) as quiet:
    time.sleep(0.02)
with bench.PeakRSS(interval=0.001) as busy:
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    time.sleep(0.05)
    del block
print(busy.peak - quiet.peak)
"""


def test_peak_rss_sees_a_transient_allocation():
    # In a fresh process: memory that this one has freed may still be resident, and be reused
    # without the resident set growing.
    rise = int(subprocess.run([sys.executable, "-c", _TRANSIENT], capture_output=True, text=True, check=True).stdout)
    assert rise > 200 * 2**20


def test_configs_are_the_named_architectures():
    import transformers

    for name, (cls, kwargs) in bench.CONFIGS.items():
        config = getattr(transformers, cls)(**kwargs)
        assert config.num_hidden_layers in (16, 30), name
    assert bench.CONFIGS["smollm-135m"][1]["num_key_value_heads"] == 3
