"""benchmarks/lens_scale.py: the peak-RSS sampler and the model configs."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "lens_scale.py"
_spec = importlib.util.spec_from_file_location("lens_scale_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_peak_rss_sees_a_transient_allocation():
    with bench.PeakRSS(interval=0.001) as quiet:
        time.sleep(0.02)
    with bench.PeakRSS(interval=0.001) as busy:
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        time.sleep(0.05)
        del block
    assert busy.peak - quiet.peak > 200 * 2**20


def test_configs_are_the_named_architectures():
    import transformers

    for name, (cls, kwargs) in bench.CONFIGS.items():
        config = getattr(transformers, cls)(**kwargs)
        assert config.num_hidden_layers in (16, 30), name
    assert bench.CONFIGS["smollm-135m"][1]["num_key_value_heads"] == 3
