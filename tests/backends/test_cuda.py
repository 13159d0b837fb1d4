"""Every backend on a CUDA GPU against ``reference`` in float64 on the CPU: outputs, gradients of
q, k, v (and of a learnable alpha and bandwidth), masks, causal calls, non-finite inputs, and a
Hugging Face model. Skipped without a GPU. ``flex`` here is the compiled FlexAttention kernel
(one compilation per shape and option set, so the grid is kept small).
"""

from __future__ import annotations

import pytest
import torch

from levyattn import fractional_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Output tolerance relative to the largest reference value, and the gradients'.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 1e-1)}


def _inputs(dtype, nq=200, nk=200, b=2, h=3, d=32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (scale * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)).to("cuda", dtype).requires_grad_()
        for n in (nq, nk, nk)
    ]


def _padding(b, nk):
    keep = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    keep[0, ..., nk - 37 :] = False
    return keep


def _compare(backend, dtype, *, nq=200, nk=200, causal=False, padding=False, alpha=1.2, per_head=False):
    q, k, v = _inputs(dtype, nq, nk)
    mask = _padding(q.shape[0], nk) if padding else None
    if per_head:
        alpha = torch.tensor([0.8, 1.2, 1.9], dtype=torch.float64)
        bandwidth = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    else:
        bandwidth = 1.0
    kwargs = dict(is_causal=causal)

    def leaves(device, dt):
        out = [x.detach().to(device, dt).requires_grad_() for x in (q, k, v)]
        if per_head:
            out += [t.detach().clone().to(device).requires_grad_() for t in (alpha, bandwidth)]
        return out

    def run(backend_name, device, dt, xs):
        a, bw = (xs[3], xs[4]) if per_head else (alpha, bandwidth)
        m = mask.to(device) if mask is not None else None
        return fractional_attention(*xs[:3], alpha=a, bandwidth=bw, attn_mask=m, backend=backend_name, **kwargs)

    ref_leaves = leaves("cpu", torch.float64)
    ref = run("reference", "cpu", torch.float64, ref_leaves)
    gpu_leaves = leaves("cuda", dtype)
    out = run(backend, "cuda", dtype, gpu_leaves)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert torch.isfinite(out).all()
    out_tol, grad_tol = TOLERANCE[dtype]
    scale = ref.abs().max().item()
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= out_tol * scale, f"{backend} {dtype}: output error {err:.3e} > {out_tol * scale:.3e}"

    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(grad_out)
    out.backward(grad_out.to("cuda", dtype))
    names = ("q", "k", "v", "alpha", "bandwidth")
    for name, r, g in zip(names, ref_leaves, gpu_leaves):
        assert g.grad is not None, f"{backend}: no gradient for {name}"
        gscale = r.grad.abs().max().item()
        gerr = (g.grad.double().cpu() - r.grad).abs().max().item()
        assert gerr <= grad_tol * gscale, f"{backend} {dtype}: d{name} error {gerr:.3e} > {grad_tol * gscale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_tiled_matches_reference(dtype, causal, padding):
    _compare("tiled", dtype, causal=causal, padding=padding)


def test_auto_matches_reference():
    _compare("auto", torch.float32, nq=120, causal=True, padding=True)


@pytest.mark.parametrize(
    "dtype,causal,padding,nq",
    [
        (torch.float32, False, False, 200),
        (torch.float32, True, True, 77),  # cross-attention, bottom-right causal, padded keys
        (torch.bfloat16, True, False, 200),
    ],
)
def test_compiled_flex_matches_reference(dtype, causal, padding, nq):
    _compare("flex", dtype, nq=nq, causal=causal, padding=padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_backend_at_alpha_2_matches_reference(dtype):
    _compare("sdpa", dtype, alpha=2.0, causal=True)


def test_learnable_per_head_alpha_and_bandwidth_on_the_gpu():
    _compare("auto", torch.float32, per_head=True, padding=True)


@pytest.mark.parametrize("backend", ["tiled", "flex", "auto"])
def test_nonfinite_key_poisons_exactly_the_rows_that_see_it(backend):
    q, k, v = (x.detach() for x in _inputs(torch.float32, nq=64, nk=64))
    k[:, :, 40] = float("nan")
    with torch.no_grad():
        out = fractional_attention(q, k, v, is_causal=True, backend=backend)
        ref = fractional_attention(*(x.cpu().double() for x in (q, k, v)), is_causal=True, backend="reference")
    assert torch.equal(out.isnan().cpu(), ref.isnan()), backend
    assert ref.isnan()[..., :40, :].sum() == 0 and ref.isnan()[..., 40:, :].all()


@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_large_bfloat16_inputs_stay_finite(backend):
    q, k, v = (x.detach() for x in _inputs(torch.bfloat16, nq=1024, nk=1024, b=1, h=2, d=64, scale=300.0))
    with torch.no_grad():
        out = fractional_attention(q, k, v, is_causal=True, backend=backend)
        ref = fractional_attention(*(x.cpu().double() for x in (q, k, v)), is_causal=True, backend="reference")
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= TOLERANCE[torch.bfloat16][0] * ref.abs().max().item()


def test_hugging_face_llama_on_the_gpu_matches_the_reference_backend():
    transformers = pytest.importorskip("transformers")
    from levyattn.integrations.huggingface import register

    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=256, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=register()).cuda().eval()
    ids = torch.randint(0, 256, (2, 150), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding
    logits = {}
    for backend in ("auto", "flex", "tiled", "reference"):
        model.config.fna_backend = backend
        with torch.no_grad():
            logits[backend] = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    ref = logits.pop("reference")[keep]
    for backend, out in logits.items():
        err = (out[keep] - ref).abs().max().item()
        assert err <= 1e-3 * ref.abs().max().item(), f"{backend}: logits differ from reference by {err:.3e}"
