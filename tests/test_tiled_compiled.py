"""The compiled paths of the ``tiled`` backend equal ``reference``, and fall back cleanly.

On the CPU the Euclidean power-law path runs through ``torch.compile``: small problems in one
piece (``_whole_forward``, ``_whole_backward``), larger ones as the tile loop with compiled tiles.
For the tiles the one-piece threshold is lowered so that small problems take the tile loop, with
4-row tiles so that every case crosses tile boundaries. Each test checks that the compiled code really ran.
"""

from __future__ import annotations

import pytest
import torch
from test_functional import _mask, assert_matches_reference, make_qkv

import levyattn.backends.tiled as tiled
from levyattn import fractional_attention


@pytest.fixture
def compiled(monkeypatch):
    """Compilation on; yields the names of the compiled functions as they run."""
    monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)
    calls = []
    real_compile = torch.compile

    def counting_compile(fn, **kw):
        compiled = real_compile(fn, **kw)

        def run(*args):
            calls.append(fn.__name__)
            return compiled(*args)

        return run

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(tiled, "_compiled_variants", {})
    monkeypatch.setattr(tiled, "_compile_failed", [])
    yield calls
    assert not tiled._compile_failed, tiled._compile_failed


@pytest.fixture
def compiled_tiles(compiled, monkeypatch):
    """Compilation on, every problem through the tile loop in 4-row tiles."""
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(tiled, "MIN_TILE_ROWS", 4)
    monkeypatch.setattr(tiled, "WHOLE_MAX_PAIRS", -1)
    monkeypatch.setattr(tiled, "WHOLE_MAX_PAIRS_INFERENCE", -1)
    return compiled


def _ran_compiled(calls, path="tiles"):
    """The compiled code of ``path`` ran (the forward and backward tiles, or the one piece's two
    functions), and compilation never failed."""
    names = {"_kernel_weights_", "_kernel_grads_"} if path == "tiles" else {"_whole_forward", "_whole_backward"}
    return names <= set(calls) and not tiled._compile_failed


def _compiled_path(request, path):
    return request.getfixturevalue("compiled_tiles" if path == "tiles" else "compiled")


CASES = [
    (torch.float64, 1e-10, mask, opts)
    for mask in ("padding", "arbitrary", "additive", None)
    for opts in ({}, dict(is_causal=True), dict(exclude_self=True, bandwidth=0.1))
] + [(torch.float32, 1e-5, mask, {}) for mask in ("padding", None)]


@pytest.mark.parametrize("path", ["tiles", "whole"])
@pytest.mark.parametrize("dtype, tol, mask, opts", CASES, ids=str)
def test_compiled_paths_match_reference(request, path, dtype, tol, mask, opts):
    calls = _compiled_path(request, path)
    q, k, v = make_qkv(nq=11, nk=16 if not opts else 11, dtype=dtype)
    kw = dict(alpha=1.2, attn_mask=_mask(mask, 2, 2, q.shape[-2], k.shape[-2]), **opts)
    if mask == "additive":
        kw["attn_mask"] = kw["attn_mask"].to(dtype)
    assert_matches_reference("tiled", q, k, v, tol, **kw)
    assert tiled.runs_whole(q, k, _call(**kw), needs_grad=True) == (path == "whole")
    assert _ran_compiled(calls, path)


def test_one_piece_cross_attention_and_decoding(compiled):
    """Nq != Nk, causal (bottom-right aligned), and one query against a key/value cache."""
    for nq in (5, 1):
        q, k, v = make_qkv(nq=nq, nk=9)
        assert_matches_reference("tiled", q, k, v, 1e-10, alpha=0.7, is_causal=True)
    assert _ran_compiled(compiled, "whole")


def _call(alpha=1.2, bandwidth=1.0, attn_mask=None, is_causal=False, exclude_self=False):
    """The validated call ``fractional_attention`` makes for these Euclidean options."""
    return tiled.AttentionCall(
        alpha=alpha,
        bandwidth=bandwidth,
        manifold="euclidean",
        rescale=True,
        d_intrinsic=None,
        sphere_radius=1.0,
        density_a=0.0,
        attn_mask=attn_mask,
        is_causal=is_causal,
        exclude_self=exclude_self,
    )


@pytest.mark.parametrize("path", ["tiles", "whole"])
def test_compiled_gradcheck(request, path):
    calls = _compiled_path(request, path)
    q, k, v = make_qkv(b=1, h=2, nq=6, nk=7, d=3, dv=2)
    mask = torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    assert torch.autograd.gradcheck(
        lambda q, k, v: fractional_attention(q, k, v, alpha=0.8, attn_mask=mask, backend="tiled"), (q, k, v)
    )
    assert _ran_compiled(calls, path)


@pytest.mark.parametrize("path", ["tiles", "whole"])
def test_zero_distances_compiled_give_finite_gradients(request, path):
    calls = _compiled_path(request, path)
    q, k, v = make_qkv(nq=8, nk=8, dtype=torch.float32)
    k = q.detach().clone().requires_grad_()  # every query meets its own copy at distance 0
    out = fractional_attention(q, k, v, alpha=1.2, backend="tiled")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert _ran_compiled(calls, path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_piece_fully_masked_rows_give_zero_output_and_gradient(compiled, dtype):
    """A row with no allowed key: output 0 and gradient 0, even where the upstream gradient is
    large (dividing by a tiny row sum would overflow the gradient into inf * 0 = NaN)."""
    q, k, v = make_qkv(nq=6, nk=6, dtype=dtype, scale=1e3)
    keep = torch.ones(2, 2, 6, 6, dtype=torch.bool)
    keep[:, :, 2] = False  # query 2 sees no key
    out = fractional_attention(q, k, v, alpha=1.2, attn_mask=keep, backend="tiled")
    grad_q, grad_k, grad_v = torch.autograd.grad((out * 1e30).sum(), (q, k, v))
    assert (out[:, :, 2] == 0).all() and (grad_q[:, :, 2] == 0).all()
    assert all(torch.isfinite(g).all() for g in (out, grad_q, grad_k, grad_v))
    assert _ran_compiled(compiled, "whole")


@pytest.mark.parametrize("path", ["tiles", "whole"])
def test_failed_compilation_warns_and_falls_back(monkeypatch, path):
    if path == "tiles":
        monkeypatch.setattr(tiled, "WHOLE_MAX_PAIRS", -1)
        monkeypatch.setattr(tiled, "WHOLE_MAX_PAIRS_INFERENCE", -1)
    monkeypatch.setattr(tiled, "_compiled_variants", {})
    monkeypatch.setattr(tiled, "_compile_failed", [])
    monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)

    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    q, k, v = make_qkv()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        out, grads = _run(q, k, v)
    ref_out, ref_grads = _run(q, k, v, backend="reference")
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert tiled._compile_failed and not tiled.compile_wanted(q, _call())


def _run(q, k, v, backend="tiled"):
    out = fractional_attention(q, k, v, alpha=1.2, backend=backend)
    return out, torch.autograd.grad(out.sum(), (q, k, v))


@pytest.mark.parametrize("change", ["env-off", "too-large", "gaussian"])
@pytest.mark.parametrize("needs_grad", [True, False])
def test_compile_policy(monkeypatch, change, needs_grad):
    pairs = 2 * 2 * 11 * 11
    limit = "WHOLE_MAX_PAIRS" if needs_grad else "WHOLE_MAX_PAIRS_INFERENCE"
    other = "WHOLE_MAX_PAIRS_INFERENCE" if needs_grad else "WHOLE_MAX_PAIRS"
    monkeypatch.setattr(tiled, "_compile_failed", [])
    monkeypatch.setattr(tiled, limit, pairs)
    monkeypatch.setattr(tiled, other, -1)  # the other limit plays no part
    monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)
    q, k, _ = make_qkv()
    call = _call()
    assert tiled.compile_wanted(q, call) and tiled.runs_whole(q, k, call, needs_grad)
    if change == "env-off":
        monkeypatch.setenv("LEVYATTN_COMPILE", "0")
    if change == "too-large":
        monkeypatch.setattr(tiled, limit, pairs - 1)
    if change == "gaussian":
        call = _call(alpha=2.0)
    assert not tiled.runs_whole(q, k, call, needs_grad)
    assert tiled.compile_wanted(q, call) == (change == "too-large")  # the tiles still compile


def test_inference_runs_in_one_piece_below_its_own_limit(compiled, monkeypatch):
    """Without gradients: one piece up to WHOLE_MAX_PAIRS_INFERENCE, compiled tiles above it."""
    q, k, v = (t.detach() for t in make_qkv(dtype=torch.float32))
    monkeypatch.setattr(tiled, "WHOLE_MAX_PAIRS_INFERENCE", 2 * 2 * 11 * 11)
    with torch.no_grad():
        out = fractional_attention(q, k, v, alpha=1.2, is_causal=True, backend="tiled")
        assert set(compiled) == {"_whole_forward"}
        monkeypatch.setattr(tiled, "WHOLE_MAX_PAIRS_INFERENCE", 2 * 2 * 11 * 11 - 1)
        tiled_out = fractional_attention(q, k, v, alpha=1.2, is_causal=True, backend="tiled")
        assert "_kernel_weights_" in compiled
    ref = fractional_attention(q, k, v, alpha=1.2, is_causal=True, backend="reference")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tiled_out, ref)


def test_training_with_compiled_attention_matches_uncompiled(compiled, monkeypatch):
    """A few optimiser steps of an FNA classifier with a padding mask and a shared, self-excluding
    query/key projection: the compiled one-piece path gives the losses of the uncompiled one."""
    from levyattn.models import build_model

    def losses():
        torch.manual_seed(0)
        config = dict(vocab_size=50, num_classes=2, max_len=12, d_model=16, num_layers=1, num_heads=1, qk_share=True)
        model = build_model("text_classifier", config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1))
        padding = torch.arange(12) >= torch.tensor([12, 9, 5, 12, 7, 12, 3, 10]).unsqueeze(-1)
        labels = torch.arange(8) % 2
        out = []
        for _ in range(4):
            loss = torch.nn.functional.cross_entropy(model(tokens, key_padding_mask=padding), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    monkeypatch.setenv("LEVYATTN_COMPILE", "0")
    eager = losses()
    assert not compiled
    monkeypatch.delenv("LEVYATTN_COMPILE")
    torch.testing.assert_close(losses(), eager, rtol=1e-5, atol=1e-6)
    assert _ran_compiled(compiled, "whole")
