"""The compiled tiles of the ``tiled`` backend equal ``reference``, and fall back cleanly.

Large CPU problems run the Euclidean tiles through ``torch.compile``; here the size threshold
is lowered so that small problems take that path, tiles are 4 rows so every case crosses tile
boundaries, and each test checks that the compiled code really ran.
"""

from __future__ import annotations

import pytest
import torch
from test_functional import _mask, assert_matches_reference, make_qkv

import levyattn.backends.tiled as tiled
from levyattn import fractional_attention


@pytest.fixture
def compiled_tiles(monkeypatch):
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(tiled, "MIN_TILE_ROWS", 4)
    monkeypatch.setattr(tiled, "COMPILE_MIN_ELEMENTS", 0)
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
    monkeypatch.setattr(tiled, "_compiled_tiles", {})
    monkeypatch.setattr(tiled, "_compile_failed", [])
    yield calls
    assert not tiled._compile_failed, tiled._compile_failed


def _ran_compiled(calls):
    """Both the forward and the backward tiles ran compiled (and compilation never failed)."""
    return {"_kernel_weights_", "_kernel_grads_"} <= set(calls) and not tiled._compile_failed


CASES = [
    (torch.float64, 1e-10, mask, opts)
    for mask in ("padding", "arbitrary", "additive", None)
    for opts in ({}, dict(is_causal=True), dict(exclude_self=True, bandwidth=0.1))
] + [(torch.float32, 1e-5, mask, {}) for mask in ("padding", None)]


@pytest.mark.parametrize("dtype, tol, mask, opts", CASES, ids=str)
def test_compiled_tiles_match_reference(compiled_tiles, dtype, tol, mask, opts):
    q, k, v = make_qkv(nq=11, nk=16 if not opts else 11, dtype=dtype)
    kw = dict(alpha=1.2, attn_mask=_mask(mask, 2, 2, q.shape[-2], k.shape[-2]), **opts)
    if mask == "additive":
        kw["attn_mask"] = kw["attn_mask"].to(dtype)
    assert_matches_reference("tiled", q, k, v, tol, **kw)
    assert tiled.compile_wanted(q, k, _call(**kw))
    assert _ran_compiled(compiled_tiles)


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


def test_compiled_tiles_gradcheck(compiled_tiles):
    q, k, v = make_qkv(b=1, h=2, nq=6, nk=7, d=3, dv=2)
    mask = torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    assert torch.autograd.gradcheck(
        lambda q, k, v: fractional_attention(q, k, v, alpha=0.8, attn_mask=mask, backend="tiled"), (q, k, v)
    )
    assert _ran_compiled(compiled_tiles)


def test_zero_distances_compiled_give_finite_gradients(compiled_tiles):
    q, k, v = make_qkv(nq=8, nk=8, dtype=torch.float32)
    k = q.detach().clone().requires_grad_()  # every query meets its own copy at distance 0
    out = fractional_attention(q, k, v, alpha=1.2, backend="tiled")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert _ran_compiled(compiled_tiles)


def test_failed_compilation_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(tiled, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(tiled, "_compiled_tiles", {})
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
    assert tiled._compile_failed and not tiled.compile_wanted(q, k, _call())


def _run(q, k, v, backend="tiled"):
    out = fractional_attention(q, k, v, alpha=1.2, backend=backend)
    return out, torch.autograd.grad(out.sum(), (q, k, v))


@pytest.mark.parametrize(
    "change",
    [
        dict(env="0"),
        dict(device_size=-1),
        dict(alpha=2.0),
    ],
    ids=["env-off", "too-small", "gaussian"],
)
def test_compile_policy(monkeypatch, change):
    monkeypatch.setattr(tiled, "_compile_failed", [])
    monkeypatch.setattr(tiled, "COMPILE_MIN_ELEMENTS", 2 * 2 * 11 * 11)
    monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)
    q, k, _ = make_qkv()
    assert tiled.compile_wanted(q, k, _call())
    call = _call()
    if "env" in change:
        monkeypatch.setenv("LEVYATTN_COMPILE", change["env"])
    if "device_size" in change:
        monkeypatch.setattr(tiled, "COMPILE_MIN_ELEMENTS", 2 * 2 * 11 * 11 + 1)
    if "alpha" in change:
        call = _call(alpha=change["alpha"])
    assert not tiled.compile_wanted(q, k, call)
