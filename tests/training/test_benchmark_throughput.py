"""benchmarks/training_throughput.py --preset: the preset's own model, FNA and softmax at the same size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "training_throughput.py"
sys.path.insert(0, str(_PATH.parent))  # the script imports its folder's helpers, as when run
_spec = importlib.util.spec_from_file_location("throughput_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("preset", "input_shape"),
    [
        ("digits-vit", (2, 1, 8, 8)),
        ("mnist-vit", (2, 1, 28, 28)),
        ("imdb-1layer-h8", (2, 512)),
        ("lm-toy-fna", (2, 64)),
    ],
)
def test_preset_models_differ_only_in_attention(preset, input_shape):
    fna, fna_inputs, kwargs = bench.make_from_preset(preset, "fna", 1.2, batch=2)
    soft, soft_inputs, _ = bench.make_from_preset(preset, "softmax", None, batch=2)
    assert tuple(fna_inputs[0].shape) == input_shape
    assert _params(fna) == _params(soft)
    assert [n for n, _ in fna.named_parameters()] == [n for n, _ in soft.named_parameters()]
    assert fna(*fna_inputs, **kwargs).logits.shape[0] == 2


def test_preset_alpha_reaches_the_attention():
    model, _, _ = bench.make_from_preset("digits-vit", "fna", 2.0, batch=1)
    alphas = {m.alpha for m in model.modules() if isinstance(getattr(m, "alpha", None), float)}
    assert alphas == {2.0}


def test_presets_without_a_timeable_model_are_refused():
    with pytest.raises(ValueError, match="multiscale-1layer"):
        bench.make_from_preset("multiscale-1layer", "fna", 1.2, batch=1)
