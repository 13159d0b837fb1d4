"""The ``tiled`` backend's fused CPU kernel equals ``reference``, and falls back cleanly.

The rest of the suite runs the tile loop (``LEVYATTN_COMPILE=0``, see conftest.py); here the
kernel is built (once per machine, cached) and used. Tiles of 4 query rows and 8 keys make every
case cross query-block and key-block boundaries and end blocks with partial vectors. Each test
checks that the kernel really ran.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_functional import ALPHAS, MASKS, _mask, assert_matches_reference, make_qkv, run

import levyattn.backends.fused_cpu as fused_cpu
import levyattn.backends.tiled as tiled
import levyattn.functional as functional
from levyattn import fractional_attention
from levyattn.kernels import key_center


def _use_kernel(mp: pytest.MonkeyPatch, query_rows: int, keys: int) -> list:
    """The fused kernel on, in ``query_rows`` x ``keys`` tiles; returns the list to which each
    call through it appends its query shape."""
    mp.delenv("LEVYATTN_COMPILE", raising=False)
    mp.setattr(fused_cpu, "KEY_BLOCK", keys)
    mp.setattr(fused_cpu, "query_block", lambda nq: query_rows)
    calls = []
    real = fused_cpu.attention

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    mp.setattr(fused_cpu, "attention", counting)
    return calls


@pytest.fixture
def fused(monkeypatch):
    """The fused kernel on, in 4 x 8 tiles; yields the calls that ran through it."""
    yield _use_kernel(monkeypatch, 4, 8)
    assert "failed" not in fused_cpu._state, fused_cpu._state.get("failed")


def _call(alpha=1.2) -> tiled.AttentionCall:
    """A plain Euclidean call as ``fractional_attention`` validates it."""
    return tiled.AttentionCall(alpha, 1.0, "euclidean", True, None, 1.0, 0.0, None, False, False)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("rescale", [True, False])
def test_fused_matches_reference_float64(fused, alpha, rescale):
    q, k, v = make_qkv(nq=11, nk=19)
    assert_matches_reference("tiled", q, k, v, 1e-10, alpha=alpha, rescale=rescale)
    assert fused


OPTIONS = [
    {},
    dict(bandwidth=0.1),
    dict(bandwidth=10.0, rescale=False),
    dict(d_intrinsic=2.5),
    dict(exclude_self=True),
    dict(is_causal=True),
    dict(is_causal=True, exclude_self=True),
]


@pytest.mark.parametrize("alpha", [0.5, 1.2, 2.0])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("nq, nk", [(11, 11), (11, 19), (19, 11)])
def test_fused_options_match_reference(fused, alpha, opts, mask, nq, nk):
    q, k, v = make_qkv(nq=nq, nk=nk)
    assert_matches_reference("tiled", q, k, v, 1e-10, alpha=alpha, attn_mask=_mask(mask, 2, 2, nq, nk), **opts)
    assert fused


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("alpha", [1.2, 2.0])
def test_fused_float32_matches_reference(fused, mask, alpha):
    q, k, v = (t.detach().float().requires_grad_() for t in make_qkv(nk=21, d=20))
    m = _mask(mask, 2, 2, 11, 21)
    m = m.float() if m is not None and m.is_floating_point() else m
    assert_matches_reference("tiled", q, k, v, 1e-5, alpha=alpha, attn_mask=m, is_causal=True)
    assert fused


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0])
def test_float32_keeps_the_accuracy_of_log1p_at_head_dim_64(fused, scale):
    """log Phi = -(64 + alpha) log1p(c r) at head dim 64: the logarithm of a rounded 1 + c r would
    carry its rounding 65-fold into the weights (about 4e-6 of the output here); the kernel's
    log1p keeps the output at float32's own accuracy."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = q * scale, k * scale
    expected = fractional_attention(q, k, v, alpha=1.2, backend="reference")
    out = fractional_attention(q.float(), k.float(), v.float(), alpha=1.2, backend="tiled")
    assert (out.double() - expected).abs().max() / expected.abs().max() < 1.5e-6
    assert fused


@pytest.mark.parametrize("d", [5, 16, 40])
@pytest.mark.parametrize("padded", [False, True])
def test_decoding_one_query_against_a_cache(fused, d, padded):
    """One query row: the kernel takes its distances directly, without a shift; its backward
    shifts (by the mean of the keys in use) and must agree as well."""
    q, k, v = make_qkv(nq=1, nk=21, d=d)
    mask = torch.arange(21).view(1, 1, 1, 21).expand(2, 1, 1, 21) < torch.tensor([21, 15]).view(2, 1, 1, 1)
    kw = dict(attn_mask=mask) if padded else {}
    assert_matches_reference("tiled", q, k, v, 1e-10, alpha=0.7, is_causal=True, exclude_self=True, **kw)
    assert fused


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 13), st.integers(1, 21), st.integers(1, 18)),
    alpha=st.sampled_from(ALPHAS),
    is_causal=st.booleans(),
    exclude_self=st.booleans(),
    blocks=st.tuples(st.integers(1, 9), st.integers(1, 40)),
)
def test_fused_agrees_with_reference_at_any_shape_and_tile(shape, alpha, is_causal, exclude_self, blocks):
    """Backends agree: any batch, heads, query and key counts, head dim and tile size."""
    b, h, nq, nk, d = shape
    q, k, v = make_qkv(b=b, h=h, nq=nq, nk=nk, d=d, dv=d % 5 + 1, seed=nq * nk)
    kw = dict(alpha=alpha, is_causal=is_causal, exclude_self=exclude_self)
    expected = run(q, k, v, "reference", **kw)
    with pytest.MonkeyPatch.context() as mp:
        calls = _use_kernel(mp, *blocks)
        got = run(q, k, v, "tiled", **kw)
    assert calls
    # Absolute as well as relative: with one visible key a gradient is exactly 0 in `reference`
    # and a rounding residue (~1e-17) here.
    for value, reference_value in zip((got[0], *got[1]), (expected[0], *expected[1])):
        torch.testing.assert_close(value, reference_value, rtol=1e-10, atol=1e-12)


def test_fused_gradcheck(fused):
    q, k, v = make_qkv(b=1, h=2, nq=6, nk=9, d=3, dv=2)
    mask = torch.rand(1, 1, 6, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    for alpha in (0.8, 2.0):
        assert torch.autograd.gradcheck(
            lambda q, k, v, a=alpha: fractional_attention(q, k, v, alpha=a, attn_mask=mask, backend="tiled"),
            (q, k, v),
        )
    assert len(fused) >= 2


def test_zero_distances_give_finite_gradients(fused):
    q, k, v = make_qkv(nq=8, nk=8, dtype=torch.float32)
    k = q.detach().clone().requires_grad_()  # every query meets its own copy at distance 0
    for alpha in (1.2, 2.0):
        out = fractional_attention(q, k, v, alpha=alpha, backend="tiled")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
    assert fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_rows_give_zero_output_and_gradient(fused, dtype):
    """A row with no allowed key: output 0 and gradient 0, even where the upstream gradient is
    large; with Nq > Nk and causal masking the first rows see no key at all."""
    q, k, v = make_qkv(nq=6, nk=6, dtype=dtype, scale=1e3)
    keep = torch.ones(2, 2, 6, 6, dtype=torch.bool)
    keep[:, :, 2] = False  # query 2 sees no key
    out = fractional_attention(q, k, v, alpha=1.2, attn_mask=keep, backend="tiled")
    grad_q, grad_k, grad_v = torch.autograd.grad((out * 1e30).sum(), (q, k, v))
    assert (out[:, :, 2] == 0).all() and (grad_q[:, :, 2] == 0).all()
    assert all(torch.isfinite(g).all() for g in (out, grad_q, grad_k, grad_v))
    q, k, v = make_qkv(nq=9, nk=4, dtype=dtype)
    out = fractional_attention(q, k, v, alpha=1.2, is_causal=True, backend="tiled")
    assert (out[:, :, :5] == 0).all() and torch.isfinite(out).all()
    assert len(fused) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_finite_at_every_scale(fused, dtype, scale):
    q, k, v = make_qkv(nq=9, nk=13, dtype=dtype, scale=scale)
    out = fractional_attention(q, k, v, alpha=1.2, backend="tiled")
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    assert fused  # low precision runs in float32, through the kernel


def test_failed_build_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension

    monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)
    monkeypatch.setattr(fused_cpu, "_state", {})

    def broken_load(**kw):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    q, k, v = make_qkv()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert_matches_reference("tiled", q, k, v, 1e-10, alpha=1.2)
    assert not fused_cpu.applies(q.device, q.dtype)


def test_the_build_runs_the_ninja_of_the_wheel(monkeypatch):
    """torch builds with the `ninja` on PATH; the wheel's binary is put first for the build, and
    PATH is restored after it."""
    import torch.utils.cpp_extension

    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(fused_cpu, "_state", {})
    seen = []

    def fake_load(**kw):
        seen.append(os.environ["PATH"].split(os.pathsep)[0])
        raise RuntimeError("stop before building")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    path = os.environ["PATH"]
    with pytest.warns(RuntimeWarning, match="stop before building"):
        assert fused_cpu._ops() is None
    assert seen == [ninja.BIN_DIR] and os.environ["PATH"] == path


@pytest.mark.parametrize("change", ["env-off", "tensor alpha", "block given"])
def test_calls_outside_the_kernel_run_the_tile_loop(fused, monkeypatch, change):
    q, k, v = make_qkv()
    tiled.attention(q, k, v, _call())
    assert len(fused) == 1
    if change == "env-off":
        monkeypatch.setenv("LEVYATTN_COMPILE", "0")
    alpha = torch.tensor(1.2, dtype=q.dtype) if change == "tensor alpha" else 1.2
    out = tiled.attention(q, k, v, _call(alpha), block=4 if change == "block given" else None)
    assert len(fused) == 1
    torch.testing.assert_close(out, fractional_attention(q, k, v, alpha=1.2, backend="reference"))


@pytest.mark.parametrize("device, dtype", [("meta", torch.float32), ("cpu", torch.float16), ("cpu", torch.bfloat16)])
def test_the_kernel_takes_cpu_float32_and_float64_only(fused, device, dtype):
    q = torch.zeros(1, 1, 2, 2, device=device, dtype=dtype)
    assert not fused_cpu.applies(q.device, q.dtype)
    assert fused_cpu.applies(torch.device("cpu"), torch.float64)


def test_auto_takes_the_kernel_on_the_cpu_where_it_applies_alpha_2_included(fused):
    """With the kernel available, ``auto`` runs every call with gradients that the kernel takes
    through it, the Gaussian too (faster than ``sdpa`` on the CPU, see the ``auto`` rule), float16
    and bfloat16 (computed in float32) included; without gradients alpha = 2 stays with ``sdpa``;
    calls the kernel does not take keep their backends."""
    q, k, v = make_qkv(b=2, h=3, nq=5, nk=9, d=4, dtype=torch.float32)
    for alpha in (1.2, 2.0):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            fused.clear()
            fractional_attention(q.to(dtype), k.to(dtype), v.to(dtype), alpha=alpha)
            assert fused == [(2, 3, 5, 4)], (alpha, dtype)
    fused.clear()
    with torch.no_grad():
        fractional_attention(q, k, v, alpha=1.2)
        assert len(fused) == 1
        fractional_attention(q, k, v, alpha=2.0)
        assert len(fused) == 1
    fused.clear()
    per_head = torch.tensor([1.0, 2.0, 0.5])  # a tensor bandwidth: sdpa, not the kernel
    out = fractional_attention(q, k, v, alpha=2.0, bandwidth=per_head)
    fractional_attention(q, k, v, alpha=2.0, density_a=0.5)
    fractional_attention(q, k, v, alpha=1.2, manifold="sphere")
    assert fused == []
    torch.testing.assert_close(out, fractional_attention(q, k, v, alpha=2.0, bandwidth=per_head, backend="reference"))


def test_training_with_the_kernel_matches_the_tile_loop(fused, monkeypatch):
    """A few optimiser steps of an FNA classifier with a padding mask and a shared, self-excluding
    query/key projection: the kernel gives the losses of the tile loop."""
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
            loss = torch.nn.functional.cross_entropy(model(tokens, key_padding_mask=padding).logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    monkeypatch.setenv("LEVYATTN_COMPILE", "0")
    tile_loop = losses()
    assert not fused
    monkeypatch.delenv("LEVYATTN_COMPILE")
    torch.testing.assert_close(losses(), tile_loop, rtol=1e-5, atol=1e-6)
    assert fused


@pytest.mark.parametrize("shape", [(1, 2, 11, 19), (2, 1, 1, 19), (19,)])
def test_the_kernel_differentiates_a_learnable_mask(fused, shape):
    """The gradient of a float mask is dS summed over the dimensions it was broadcast along."""
    q, k, v = make_qkv(nq=11, nk=19)
    g = torch.Generator().manual_seed(3)
    grads = []
    for backend in ("reference", "tiled"):
        bias = torch.randn(shape, generator=g.manual_seed(3), dtype=torch.float64, requires_grad=True)
        out = fractional_attention(q, k, v, attn_mask=bias, is_causal=True, exclude_self=True, backend=backend)
        out.pow(2).sum().backward()
        grads.append(bias.grad)
    assert fused, "the kernel did not run"
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 11, 1), (1, 2, 1, 1)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("nq", [1, 11])
def test_a_mask_broadcast_along_the_keys_is_spread_over_them(fused, shape, kind, nq):
    """A mask of key size 1 (one value for every key of its row) is a valid broadcast: the kernel
    must take it as the same value at every key, not refuse it; its gradient sums over the keys."""
    q, k, v = make_qkv(nq=nq, nk=19)
    shape = (*shape[:2], min(shape[2], nq), 1)
    g = torch.Generator().manual_seed(5)
    results = []
    for backend in ("reference", "tiled"):
        if kind == "bool":  # some rows see nothing: output and gradients 0 there
            mask = torch.rand(shape, generator=g.manual_seed(5)) > 0.3
        else:
            mask = torch.randn(shape, generator=g.manual_seed(5), dtype=torch.float64).requires_grad_()
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = fractional_attention(*leaves, attn_mask=mask, backend=backend)
        out.pow(2).sum().backward()
        results.append([out, *(x.grad for x in leaves), mask.grad if kind == "additive" else None])
    with torch.no_grad():  # inference: one query row takes the decoding op
        results[1][0] = fractional_attention(q, k, v, attn_mask=mask.detach(), backend="tiled")
    assert fused, "the kernel did not run"
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (B, H, N, d) with the same values in another layout: "rows" as the per-head view of a
    packed (B, N, 3, H, d) projection, "transposed" with columns contiguous instead of rows."""
    if layout == "rows":
        packed = torch.zeros(x.shape[0], x.shape[2], 3, x.shape[1], x.shape[3], dtype=x.dtype)
        packed[:, :, 1] = x.transpose(1, 2)
        return packed[:, :, 1].transpose(1, 2)
    if layout == "transposed":
        return x.mT.contiguous().mT
    return x.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "rows", "transposed"])
def test_peaks_are_the_largest_magnitudes_and_inf_where_an_entry_is_not_finite(fused, dtype, layout):
    assert fused_cpu.ensure_built()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=dtype)
    k = torch.randn(2, 3, 8191, 8, generator=g, dtype=dtype) * 3  # 3 x 2**16 - 48 entries: split between threads
    v = torch.randn(2, 3, 8191, 4, generator=g, dtype=dtype)
    expected = (max(q.abs().max(), k.abs().max()).item(), v.abs().max().item())
    assert fused_cpu.peaks(*(_laid_out(x, layout) for x in (q, k, v))) == expected
    for where, value in (("k", float("nan")), ("k", float("inf")), ("v", -float("inf")), ("v", float("nan"))):
        spoilt = {"k": k.clone(), "v": v.clone()}
        spoilt[where][(-1,) * 4] = value  # the last entry: the scalar tail of the last block
        qk_peak, v_peak = fused_cpu.peaks(*(_laid_out(x, layout) for x in (q, spoilt["k"], spoilt["v"])))
        assert (qk_peak, v_peak) == ((float("inf"), expected[1]) if where == "k" else (expected[0], float("inf")))


@pytest.mark.parametrize("layout", ["rows", "transposed", "heads expanded"])
@pytest.mark.parametrize("mask", [None, "padding"])
def test_the_kernel_reads_views_in_place_and_lays_the_output_out_by_token(fused, layout, mask):
    """q, k, v as views of a packed projection (read in place), with columns contiguous (copied
    first) or with keys and values shared by every head (stride 0): output and gradients as
    ``reference`` gives them from contiguous copies. The output is (B, Nq, H, dv) in memory, so
    merging its heads is a view; the incoming gradient arrives in that layout."""
    q, k, v = (x.detach() for x in make_qkv(b=2, h=3, nq=7, nk=13, d=4, dv=4))
    if layout == "heads expanded":
        k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
        inputs = [q.clone().requires_grad_(), k[:, :1].clone().requires_grad_(), v[:, :1].clone().requires_grad_()]
        as_views = lambda a, b, c: (a, b.expand_as(k), c.expand_as(v))  # noqa: E731
    else:
        inputs = [_laid_out(x, layout).requires_grad_() for x in (q, k, v)]
        as_views = lambda *xs: xs  # noqa: E731
    attn_mask = None if mask is None else torch.arange(13).view(1, 1, 1, 13).expand(2, 1, 1, 13) < 10
    kw = dict(alpha=1.3, attn_mask=attn_mask, is_causal=True)
    out = fractional_attention(*as_views(*inputs), backend="tiled", **kw)
    assert out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(2, 7, 12)
    weights = torch.linspace(-1, 1, merged.numel(), dtype=merged.dtype).view_as(merged)
    grads = torch.autograd.grad((merged * weights).sum(), inputs)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    expected = fractional_attention(*(x.contiguous() for x in as_views(*leaves)), backend="reference", **kw)
    expected_grads = torch.autograd.grad((expected.transpose(1, 2).reshape(2, 7, 12) * weights).sum(), leaves)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert fused


def test_the_kernel_shifts_by_the_centre_of_the_keys_unless_given_a_shift(fused):
    """Distances do not depend on the shift: any shift gives the same output (to rounding); the
    kernel returns the one it used, the keys' centre (key_center) when given none, and none (an
    empty tensor) for a single query row, whose distances it takes directly."""
    assert fused_cpu.ensure_built()
    q, k, v = (x.detach() for x in make_qkv(nq=7, nk=13, d=5))
    q, k = q + 1e3, k + 1e3
    flags = (6.2, 0.8, False, True, False, 4, 8)
    out, lse, shift = fused_cpu._state["ops"].forward(q, k, v, None, None, *flags)
    torch.testing.assert_close(shift, key_center(k).squeeze(-2), rtol=0, atol=1e-12)
    other = torch.randn_like(shift) + 1e3
    out_other, lse_other, used = fused_cpu._state["ops"].forward(q, k, v, None, other, *flags)
    assert torch.equal(used, other)
    torch.testing.assert_close(out_other, out, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lse_other, lse, rtol=1e-9, atol=1e-12)
    out_one, lse_one, none = fused_cpu._state["ops"].forward(q[:, :, -1:], k, v, None, None, *flags)
    assert none.numel() == 0
    torch.testing.assert_close(out_one, out[:, :, -1:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lse_one, lse[:, :, -1:], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_with_a_mask_the_kernel_shifts_by_the_centre_of_the_keys_in_use(fused, dtype, kind):
    """The centre of the keys the mask keeps for some query, per (batch, head), as key_center gives
    it, from a strided view of k and a mask broadcast along heads and queries (a padding mask) or
    not; 0 where no key is in use; the centre of all keys without a mask."""
    assert fused_cpu.ensure_built()
    g = torch.Generator().manual_seed(0)
    k = _laid_out(torch.randn(3, 2, 67, 5, generator=g, dtype=dtype) * 10 + 100, "rows")
    q, v = torch.randn(3, 2, 4, 5, generator=g, dtype=dtype), torch.randn(3, 2, 67, 3, generator=g, dtype=dtype)
    padding = (torch.rand(67, 1, 1, 3, generator=g) > 0.4).permute(3, 2, 1, 0)  # (3, 1, 1, 67), keys 3 apart
    padding[1] = False  # a batch entry with no key in use
    per_query = torch.rand(3, 2, 4, 67, generator=g) > 0.9
    flags = (6.2, 0.8, False, False, False, 4, 8)
    tolerance = dict(rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    for mask in (padding, per_query):
        given = mask if kind == "bool" else torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
        shift = fused_cpu._state["ops"].forward(q, k, v, given, None, *flags)[2]
        expected = key_center(k.double(), mask.any(-2)).squeeze(-2)
        torch.testing.assert_close(shift.double(), expected, **tolerance)
    assert torch.equal(
        fused_cpu._state["ops"].forward(q, k, v, padding, None, *flags)[2][1], torch.zeros(2, 5, dtype=dtype)
    )
    shift = fused_cpu._state["ops"].forward(q, k, v, None, None, *flags)[2]
    torch.testing.assert_close(shift.double(), key_center(k.double()).squeeze(-2), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [5, 16])
def test_decode_takes_the_largest_entries_as_it_reads_them(fused, dtype, d):
    """The decode op's magnitudes are those of q and k and of v, inf where any entry (a key no
    query sees included, and the last lanes of a partial vector) is NaN or infinite; its output
    is the forward op's."""
    assert fused_cpu.ensure_built()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, generator=g, dtype=dtype) * 3 for n in (1, 600, 600))
    keep = torch.ones(2, 1, 1, 600, dtype=torch.bool)
    keep[..., 599] = False
    flags = (6.2, 0.8, False, True, True)
    out, qk_peak, v_peak = fused_cpu._state["ops"].decode(q, k, v, keep, *flags, 512)
    assert (qk_peak, v_peak) == (max(q.abs().max(), k.abs().max()).item(), v.abs().max().item())
    expected = fused_cpu._state["ops"].forward(q, k, v, keep, None, *flags, 1, 512)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name, index in (
        ("q", (1, 2, 0, d - 1)),
        ("k", (1, 2, 599, d - 1)),
        ("k", (0, 0, 0, 0)),
        ("v", (1, 1, 599, d - 1)),
    ):
        for value in (float("nan"), float("inf"), -float("inf")):
            spoilt = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
            spoilt[name][index] = value
            _, qk, vv = fused_cpu._state["ops"].decode(spoilt["q"], spoilt["k"], spoilt["v"], keep, *flags, 512)
            assert (qk, vv) == ((float("inf"), v_peak) if name != "v" else (qk_peak, float("inf")))


def test_a_plain_decoding_step_is_checked_by_the_kernel_alone(fused, monkeypatch):
    """Without gradients, one query row: no scan of its own (the kernel takes the largest entries
    as it reads them); a NaN anywhere sends the call to the checked scan, which handles it."""
    scans, decodes = [], []
    real_scan, real_decode = functional.scan_inputs, fused_cpu.decode
    monkeypatch.setattr(functional, "scan_inputs", lambda *args: scans.append(1) or real_scan(*args))
    monkeypatch.setattr(fused_cpu, "decode", lambda *args: decodes.append(1) or real_decode(*args))
    q, k, v = (x.detach() for x in make_qkv(nq=1, nk=21, d=16))
    with torch.no_grad():
        out = fractional_attention(q, k, v, alpha=0.7, is_causal=True)
    assert scans == [] and decodes == [1]
    expected = fractional_attention(q, k, v, alpha=0.7, is_causal=True, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    scans.clear()
    k[0, 1, 4, 2] = float("nan")
    with torch.no_grad():
        out = fractional_attention(q, k, v, alpha=0.7, is_causal=True)
    assert scans == [1] and decodes == [1, 1] and fused  # the checked path ran the kernel's forward
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any() and not out[1].isnan().any()


@pytest.mark.parametrize("nq", [1, 11])
def test_keys_far_from_the_origin_keep_the_float32_accuracy(fused, nq):
    """The kernel centres q and k itself: without it, |q|^2 + |k|^2 - 2 q.k at an offset of 3e3
    would lose every digit of distances of order 1 in float32."""
    q, k, v = make_qkv(nq=nq, nk=19)
    leaves = [x.detach().float().requires_grad_() for x in (q + 3e3, k + 3e3, v)]
    # The reference of the very float32 inputs, in float64.
    expected = fractional_attention(
        *(x.detach().double() for x in leaves), alpha=1.2, is_causal=True, backend="reference"
    )
    out = fractional_attention(*leaves, alpha=1.2, is_causal=True, backend="tiled")
    assert fused
    assert (out.double() - expected).abs().max() / expected.abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(fractional_attention(*leaves, alpha=1.2, is_causal=True, backend="tiled"), out.detach())
