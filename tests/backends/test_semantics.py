"""What every backend does at the edges, as ``reference``: non-finite inputs, masked-out keys,
learnable masks, empty dimensions, mixed dtypes; each backend either computes it or refuses it
with a clear error. ``test_differential.py`` draws such calls at random; these are the named
cases."""

from __future__ import annotations

import pytest
import torch
from backend_paths import PATHS, on_path
from hypothesis import given, settings
from hypothesis import strategies as st

import levyattn.backends.flex as flex
from levyattn import FNAConfig, fractional_attention
from levyattn.backends.common import AttentionCall, log_softmax_rows, softmax_rows
from levyattn.kernels import alpha_in

NAN, INF = float("nan"), float("inf")


def qkv(b=2, h=2, nq=5, nk=6, d=4, dv=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, w, generator=g, dtype=dtype) for n, w in ((nq, d), (nk, d), (nk, dv)))


def run(path, q, k, v, **kw):
    """The output through ``path``, without gradients."""
    with on_path(path) as backend, torch.no_grad():
        return fractional_attention(q, k, v, backend=backend, **kw)


def gaussian_where_needed(path, kw):
    """sdpa computes alpha = 2 only: give it that."""
    return dict(kw, alpha=2.0) if path == "sdpa" else kw


ALL_PATHS = ("reference", *PATHS)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_a_nonfinite_input_gives_nan_in_the_rows_that_depend_on_it(path, where, value):
    q, k, v = qkv()
    kw = gaussian_where_needed(path, dict(alpha=1.2, is_causal=True))
    clean = run(path, q, k, v, **kw)
    inputs = dict(q=q.clone(), k=k.clone(), v=v.clone())
    # Query 3 of (0, 1); key 3 of (1, 0), which causal masking shows to queries 2.. (Nk - Nq = 1).
    index = (0, 1, 3, 2) if where == "q" else (1, 0, 3, 1)
    inputs[where][index] = value
    out = run(path, inputs["q"], inputs["k"], inputs["v"], **kw)
    poisoned = torch.zeros(2, 2, 5, dtype=torch.bool)
    if where == "q":
        poisoned[0, 1, 3] = True
    else:
        poisoned[1, 0, 2:] = True
    assert torch.isnan(out).all(-1).equal(poisoned) and torch.isnan(out).any(-1).equal(poisoned)
    torch.testing.assert_close(out[~poisoned], clean[~poisoned], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_finite_inputs_whose_sums_overflow_keep_finite_outputs(path):
    """One value near the float32 limit: the sum of v overflows, no output does."""
    q, k, v = qkv(dtype=torch.float32)
    v[:, :, 0, 0] = 1e38
    assert not torch.isfinite(v.sum())
    kw = gaussian_where_needed(path, dict(alpha=1.2))
    out = run(path, q, k, v, **kw)
    assert torch.isfinite(out).all()
    expected = run("reference", q.double(), k.double(), v.double(), **kw)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


HUGE = 2.0**126  # float32: six values above it add up past the largest float (2**128)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_values_near_the_largest_float_give_the_output_of_their_scaled_copy(path):
    """An output is a weighted mean of values, so it is finite when they are; the unnormalised
    sums behind it are not, and v goes through the backend divided by a power of two. Scaling
    by a power of two is exact, so the output is exactly that of v / HUGE, times HUGE."""
    q, k, v = qkv(dtype=torch.float32)
    v = (1 + v.abs() / v.abs().amax()) * HUGE  # in (2**126, 2**127]
    assert not torch.isfinite(v.sum(-2)).all()
    kw = gaussian_where_needed(path, dict(alpha=1.2, bandwidth=50.0))  # flat weights: big sums
    out = run(path, q, k, v, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, run(path, q, k, v / HUGE, **kw) * HUGE, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", ["reference", "tile loop", "fused kernel", "auto"])
@pytest.mark.parametrize("exponent", [60, 64])
def test_queries_and_keys_whose_squared_distances_overflow(path, exponent):
    """q and k near 2**64 in float32: ||q - k||^2 overflows, log Phi does not (near 2**60 the
    norm of q is still finite, and the call takes the other route to a smaller unit). With
    alpha = 1 and no kappa, multiplying q and k by 2**e is dividing the bandwidth by 2**e: both
    calls give the same output and, up to that factor, the same gradients."""
    q, k, v = qkv(dtype=torch.float32)
    scale = 2.0**exponent
    assert torch.isfinite(torch.linalg.vector_norm(q * scale)) == (exponent == 60)
    kw = dict(alpha=1.0, rescale=False)
    grads = []
    for factor, bandwidth in ((scale, 1.0), (1.0, 1 / scale)):
        inputs = [x.clone().requires_grad_() for x in (q * factor, k * factor, v)]
        with on_path(path) as backend:
            out = fractional_attention(*inputs, backend=backend, bandwidth=bandwidth, **kw)
            out.backward(torch.ones_like(out))
        assert torch.isfinite(out).all()
        grads.append((out.detach(), *(x.grad * factor for x in inputs[:2]), inputs[2].grad))
    for huge, plain in zip(*grads):
        torch.testing.assert_close(huge, plain, rtol=1e-5, atol=1e-6)
    # Logits near -220 in float32: their rounding moves the weights by about 1e-5.
    expected = run("reference", q.double(), k.double(), v.double(), bandwidth=1 / scale, **kw)
    torch.testing.assert_close(grads[0][0].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_infinities_of_opposite_sign_in_two_inputs_poison_the_rows_of_both(path):
    """+inf in q and -inf in v: the inputs' sums cancel to NaN, never to a finite total."""
    q, k, v = qkv()
    q[0, 0, 1, 0], v[1, 1, 2, 0] = INF, -INF
    kw = gaussian_where_needed(path, dict(alpha=1.2))
    out, expected = run(path, q, k, v, **kw), run("reference", q, k, v, **kw)
    assert torch.isnan(expected).any()
    assert torch.isnan(out).equal(torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("value", [NAN, INF, 1e8])
def test_a_masked_out_key_influences_nothing(path, value):
    """Neither its value nor its distance: the output is that of the other keys alone (a key
    far away, or NaN, once spoiled the centring of the whole (batch, head))."""
    q, k, v = qkv(dtype=torch.float32)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, 0, 0, 4] = False
    k[0, :, 4], v[0, :, 4] = value, value
    kw = gaussian_where_needed(path, dict(alpha=1.2))
    out = run(path, q, k, v, attn_mask=keep, **kw)
    others = [0, 1, 2, 3, 5]
    alone = run("reference", q[:1].double(), k[:1, :, others].double(), v[:1, :, others].double(), **kw)
    torch.testing.assert_close(out[:1].double(), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(
    "where, value",
    [(w, x) for w in ("q", "k", "v", "masked-out k", "masked-out v") for x in (NAN, -INF)]
    + [("v", 1e30), ("masked-out k", 1e30), ("masked-out v", 1e30)],
)
def test_a_decoding_step_with_a_nonfinite_or_huge_entry_is_reference(path, where, value):
    """One query row without gradients (the fused kernel checks such a call as it reads it and
    hands one that is not plain to the checked path): reference's output, NaN where it has NaN.
    Huge values go where they need a unit (v) or must change nothing (keys no query sees)."""
    q, k, v = qkv(nq=1, nk=9, dtype=torch.float32)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[:, :, :, 7] = False
    places = {"q": (q, (1, 0, 0, 2)), "k": (k, (1, 0, 3, 1)), "v": (v, (0, 1, 3, 2))}
    places.update({"masked-out k": (k, (1, 1, 7, 0)), "masked-out v": (v, (0, 0, 7, 1))})
    tensor, index = places[where]
    tensor[index] = value
    kw = gaussian_where_needed(path, dict(alpha=1.2, is_causal=True, attn_mask=keep))
    out, expected = run(path, q, k, v, **kw), run("reference", q, k, v, **kw)
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("far", [1e4, 1e6])
@pytest.mark.parametrize("nq", [1, 8])
def test_one_far_key_keeps_the_float32_accuracy_of_the_others(path, far, nq):
    """A key far from the others (a huge activation) must not drag the point every distance is
    taken around: with the plain mean of the keys, a key at 1e4 among 16 cost 2% of every float32
    output, at 1e6 most of it. Held to reference in float64."""
    q, k, v = qkv(b=1, h=2, nq=nq, nk=16, d=64, dv=8, dtype=torch.float32)
    k[0, 1, 5] = far
    kw = gaussian_where_needed(path, dict(alpha=1.2))
    out = run(path, q, k, v, **kw).double()
    expected = run("reference", q.double(), k.double(), v.double(), **kw)
    assert (out - expected).abs().max() <= 2e-6 * expected.abs().max()


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("far", [1e3, 1e10, 1e20])
def test_a_query_far_from_every_key_keeps_the_gaussian_weights(path, far):
    """At alpha = 2 the weights of a query far from every key rest on differences between the
    keys that its ||q||^2 would round away (at 1e10 in float32), or square past the largest float
    (1e20): every path leaves that row constant out. Held to reference in float64."""
    q, k, v = qkv(b=1, h=2, nq=3, nk=9, d=64, dv=3, dtype=torch.float32)
    q[0, 1, 0, 2] = far
    out = run(path, q, k, v, alpha=2.0).double()
    expected = run("reference", q.double(), k.double(), v.double(), alpha=2.0)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", [p for p in ALL_PATHS if p != "sdpa"])
@pytest.mark.parametrize("given", ["float", "float64 tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_alpha_just_below_2_stays_the_power_law_in_every_dtype(path, given, dtype):
    """alpha = 2 is the Gaussian, not the limit of the power law: an alpha that rounds to 2.0 in
    the computing dtype (2 - 2**-51 in float32) must still give the power law. flex (a float or a
    tensor alpha) and every path (a float64 tensor alpha) used to give the Gaussian: 0.3-0.4 off."""
    q, k, v = qkv(b=1, h=2, nq=3, nk=5, d=4, dv=3, dtype=dtype)
    alpha = 2 - 2**-51
    if given == "float64 tensor":
        alpha = torch.tensor([alpha, 1.2], dtype=torch.float64)
    expected = run("reference", q.double(), k.double(), v.double(), alpha=alpha)
    gaussian = run("reference", q.double(), k.double(), v.double(), alpha=2.0)
    assert (expected - gaussian).abs().max() > 0.1  # the two functions differ here
    out = run(path, q, k, v, alpha=alpha).double()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("alpha", ["2", "1.2 and 2"])
@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_gaussian_logits_past_float32_are_computed_where_they_fit(path, alpha, scale):
    """Coordinates near 1e19 put the Gaussian's logits -||q - k||^2 / (kappa^2 eps) past float32's
    range, whatever the unit: every path gave rows of inf and NaN (alpha = 2) or of zeros (a head
    at 2 in a tensor alpha). Such a call is computed in float64 and cast back."""
    if path == "sdpa" and alpha != "2":
        pytest.skip("sdpa computes alpha = 2 only")
    alpha = 2.0 if alpha == "2" else torch.tensor([1.2, 2.0], dtype=torch.float64)
    q, k, v = qkv(b=1, h=2, nq=4, nk=6, d=8, dv=3, dtype=torch.float64)
    q, k = q * scale, k * scale
    expected = run("reference", q, k, v, alpha=alpha)
    out = run(path, q.float(), k.float(), v.float(), alpha=alpha)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if path in ("flex", "sdpa"):
        return  # flex has no CPU backward; sdpa's gradients: test_differential
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    with on_path(path) as backend:
        fractional_attention(*leaves, alpha=alpha, backend=backend).pow(2).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize("path", [p for p in ALL_PATHS if p != "sdpa"])
@pytest.mark.parametrize("given", ["float", "per-head tensor"])
@pytest.mark.parametrize("nq", [1, 4])
def test_a_kernel_scale_past_float32_is_computed_where_it_fits(path, given, nq):
    """eps = 1e-12 at alpha = 0.3 puts the power law's scale eps**(-1/alpha) at 1e40, past
    float32's range: every path gave rows 2.8 off float64 (a scale of inf), with no error, and so
    did the fused kernel's decoding step (one query). Such a call is computed in float64 and cast
    back."""
    q, k, v = qkv(b=1, h=2, nq=nq, nk=6, d=8, dv=3, dtype=torch.float64)
    bandwidth = 1e-12 if given == "float" else torch.tensor([1e-12, 1.0], dtype=torch.float64)
    expected = run("reference", q, k, v, alpha=0.3, bandwidth=bandwidth)
    out = run(path, q.float(), k.float(), v.float(), alpha=0.3, bandwidth=bandwidth)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_kernel_scale_past_float64_is_refused_with_its_parameters():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    message = r"bandwidth=1e-100 with alpha=0.3 puts the kernel's scale eps\*\*\(-1/alpha\) at 1e333"
    with pytest.raises(ValueError, match=message):
        fractional_attention(q, q, q, alpha=0.3, bandwidth=1e-100)
    with pytest.raises(ValueError, match=message):
        FNAConfig(alpha=0.3, bandwidth=1e-100)
    fractional_attention(q, q, q, alpha=0.3, bandwidth=1e-90)  # 1e300: allowed


@pytest.mark.parametrize("path", ["reference", "tile loop"])
def test_power_law_heads_far_apart_keep_finite_parameter_gradients(path):
    """A tensor alpha computes the Gaussian beside the power law for every head and picks one; at
    distances near 1e20 the unpicked Gaussian's z**2 overflowed, and its gradient, times the 0
    that the pick gave it, made the bandwidth's gradient NaN (finite inputs, every path)."""
    q, k, v = qkv(b=1, h=2, nq=1, nk=3, d=1, dv=2, dtype=torch.float64)
    q, k = q * 1e20, k * 1e20
    grads = {}
    for dtype in (torch.float32, torch.float64):
        bandwidth = torch.tensor([1.8, 0.7], dtype=torch.float64, requires_grad=True)
        alpha = torch.tensor([1.3, 1.6], dtype=torch.float64)
        with on_path(path if dtype == torch.float32 else "reference") as backend:
            out = fractional_attention(q.to(dtype), k.to(dtype), v.to(dtype), alpha=alpha, bandwidth=bandwidth,
                                       rescale=False, backend=backend)  # fmt: skip
        grads[dtype] = torch.autograd.grad(out.double().sum(), bandwidth)[0]
    torch.testing.assert_close(grads[torch.float32], grads[torch.float64], rtol=1e-4, atol=1e-6)


def test_alpha_in_keeps_values_below_2_below_2_and_their_gradient():
    alpha = torch.tensor([2 - 2**-51, 2.0, 1.2, 0.5], dtype=torch.float64, requires_grad=True)
    cast = alpha_in(alpha, torch.float32)
    assert cast.dtype == torch.float32
    assert cast.tolist() == [torch.nextafter(torch.tensor(2.0), torch.tensor(0.0)).item(), 2.0, 1.2000000476837158, 0.5]
    cast.sum().backward()
    assert alpha.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert alpha_in(2 - 2**-51, torch.float32).item() < 2 and alpha_in(2.0, torch.float32).item() == 2


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("value", [NAN, INF])
def test_a_nan_or_plus_inf_mask_entry_gives_nan_in_its_row(path, value):
    q, k, v = qkv()
    mask = torch.zeros(2, 2, 5, 6, dtype=torch.float64)
    mask[1, 1, 2, 4] = value
    mask[0, 0, 1, 3] = -INF  # removes a pair, as always
    out = run(path, q, k, v, attn_mask=mask, **gaussian_where_needed(path, dict(alpha=1.2)))
    poisoned = torch.zeros(2, 2, 5, dtype=torch.bool)
    poisoned[1, 1, 2] = True
    assert torch.isnan(out).any(-1).equal(poisoned) and torch.isnan(out[1, 1, 2]).all()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_gradients_of_the_finite_rows_survive_a_nan_row(path):
    """A NaN row passes no gradient back; the other rows' gradients are those of the finite inputs."""
    q, k, v = qkv()
    q[0, 0, 2] = NAN
    kw = gaussian_where_needed(path, dict(alpha=1.2))
    grads = {}
    for p in ("reference", path):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with on_path(p) as backend:
            out = fractional_attention(*leaves, backend="tiled" if p == "flex" else backend, **kw)
        out.nan_to_num(0.0).sum().backward()
        grads[p] = [x.grad for x in leaves]
    for got, want in zip(grads[path], grads["reference"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["tile loop", "fused kernel", "auto", "sdpa"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 6), (5, 6), (6,)])
def test_a_learnable_float_mask_gets_the_reference_gradient(path, shape):
    q, k, v = qkv()
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(shape, generator=g, dtype=torch.float64)
    kw = gaussian_where_needed(path, dict(alpha=1.2, is_causal=True))
    grads = []
    for p in ("reference", path):
        leaf = bias.clone().requires_grad_()
        with on_path(p) as backend:
            fractional_attention(q, k, v, attn_mask=leaf, backend=backend, **kw).pow(2).sum().backward()
        grads.append(leaf.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_flex_refuses_a_learnable_mask():
    """On a GPU (here: any device but the CPU, whose flex has no backward at all)."""
    bias = torch.zeros(5, 6, requires_grad=True)
    call = AttentionCall(1.2, 1.0, "euclidean", True, None, 1.0, 0.0, bias, False, False)
    reason = flex.unsupported(call, torch.empty(2, 2, 5, 4, device="meta"), needs_grad=True)
    assert "cannot differentiate a float attn_mask" in reason


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("empty", ["batch", "heads", "queries", "keys", "value dim"])
def test_empty_dimensions_give_zeros_and_zero_gradients(path, empty):
    sizes = dict(b=2, h=2, nq=5, nk=6, dv=3)
    sizes[{"batch": "b", "heads": "h", "queries": "nq", "keys": "nk", "value dim": "dv"}[empty]] = 0
    leaves = [x.requires_grad_(path != "flex") for x in qkv(**sizes)]
    with on_path(path) as backend:
        out = fractional_attention(*leaves, backend=backend, **gaussian_where_needed(path, dict(alpha=1.2)))
    assert out.shape == (sizes["b"], sizes["h"], sizes["nq"], sizes["dv"])
    assert not out.any()  # no key: output 0
    if path != "flex":
        out.sum().backward()
        assert all(x.grad is not None and not x.grad.any() for x in leaves)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_a_one_dimensional_key_mask(path):
    q, k, v = qkv()
    keep = torch.tensor([True, False, True, True, False, True])
    kw = gaussian_where_needed(path, dict(alpha=2.0))
    out = run(path, q, k, v, attn_mask=keep, **kw)
    torch.testing.assert_close(out, run("reference", q, k, v, attn_mask=keep.expand(2, 2, 5, 6), **kw))


@pytest.mark.parametrize("path", ["reference", "tile loop", "auto"])
def test_float64_parameters_with_float32_inputs(path):
    q, k, v = qkv(dtype=torch.float32)
    alpha = torch.tensor([1.2, 1.6], dtype=torch.float64, requires_grad=True)
    bandwidth = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    with on_path(path) as backend:
        out = fractional_attention(q, k, v, alpha=alpha, bandwidth=bandwidth, backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert alpha.grad.dtype == bandwidth.grad.dtype == torch.float64


def test_flex_warns_when_it_runs_out_of_compiled_variants(monkeypatch):
    """Past its variant limit dynamo would run FlexAttention uncompiled without a word."""
    monkeypatch.setattr(flex, "COMPILED_VARIANTS", 0)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="limit of 0 compiled variants"), torch.no_grad():
        out = fractional_attention(q, k, v, backend="flex")
    torch.testing.assert_close(out, run("reference", q, k, v))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), keys=st.integers(1, 6), seed=st.integers(0, 100))
def test_log_softmax_rows_is_log_softmax_and_keeps_fully_masked_rows_at_minus_inf(rows, keys, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, keys, generator=g, dtype=torch.float64) * 30
    logits[0] = float("-inf")  # a row with no key left
    logits.requires_grad_(True)
    out = log_softmax_rows(logits)
    assert torch.all(out[0] == float("-inf"))
    torch.testing.assert_close(out[1:], torch.log_softmax(logits[1:], -1))
    torch.testing.assert_close(softmax_rows(logits), torch.exp(out))
    torch.exp(out).sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[0] == 0)


@pytest.mark.parametrize("path", ALL_PATHS)
@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    alpha=st.sampled_from([0.7, 1.2, 2.0]),
    is_causal=st.booleans(),
    offset=st.sampled_from([-1e4, -1e9, "lowest", 1e4, 1e9]),
    rows=st.lists(st.booleans(), min_size=5, max_size=5),
    batched=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_constant_added_to_rows_of_a_float_mask_changes_nothing(
    path, dtype, alpha, is_causal, offset, rows, batched, seed
):
    """Row normalisation does not see a constant added to a row of the mask: a row masked at -1e9
    or the dtype's lowest value (a padding query under a float padding mask) had weights summing to
    its number of keys in reference, and gradients as many times too large on every path."""
    if path == "sdpa":
        alpha = 2.0
    q, k, v = qkv(dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    base = torch.randn((2, 1, 5, 6) if batched else (5, 6), generator=g, dtype=dtype)
    base = base.masked_fill(torch.rand(base.shape, generator=g) < 0.2, -INF)
    chosen = torch.tensor(rows)
    base[..., chosen, :] = base[..., chosen, :].clamp_min(0.0).clamp_max(0.0)  # 0, and -inf where removed
    constant = torch.finfo(dtype).min if offset == "lowest" else offset
    shifted = base.clone()
    shifted[..., chosen, :] += constant
    grad_out = torch.randn(2, 2, 5, 3, generator=g, dtype=dtype)
    results = []
    for mask in (base, shifted):
        leaves = [x.clone().requires_grad_(path != "flex") for x in (q, k, v)]
        with on_path(path) as backend:
            out = fractional_attention(*leaves, alpha=alpha, attn_mask=mask, is_causal=is_causal, backend=backend)
        grads = [] if path == "flex" else torch.autograd.grad(out, leaves, grad_out)
        results.append([out, *grads])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.detach().abs().max()))
    if path == "reference":
        kw = dict(alpha=alpha, attn_mask=shifted, is_causal=is_causal)
        sums = fractional_attention(q, k, v, return_weights=True, **kw)[1].sum(-1)
        torch.testing.assert_close(sums, torch.where(sums > 0, 1.0, 0.0).to(dtype), rtol=0, atol=10 * tol)


@pytest.mark.parametrize("path", ["reference", "tile loop", "auto"])
@pytest.mark.parametrize("density_a", [0.0, 0.5])
def test_a_row_masked_at_the_lowest_value_is_normalised_to_one(path, density_a):
    """The density term's column sums do see a row's constant, so its mask is not shifted:
    reference and the tile loop normalise each row by its sum, not by its log-sum-exp (max +
    log(sum) rounded to the max, and the weights of such a row summed to 6, its number of keys,
    in the output and in the gradients)."""
    q, k, v = qkv(dtype=torch.float32)
    mask = torch.zeros(5, 6)
    mask[2] = torch.finfo(torch.float32).min
    ones = torch.ones_like(v, requires_grad=True)
    with on_path(path) as backend:
        out = fractional_attention(q, k, ones, attn_mask=mask, density_a=density_a, backend=backend)
    (grad_v,) = torch.autograd.grad(out[..., 2, :].sum(), ones)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_v.sum(-2), torch.ones(2, 2, 3), rtol=0, atol=1e-6)  # row 2's weights, summed
    if path == "reference":
        _, weights = fractional_attention(q, k, v, attn_mask=mask, density_a=density_a, return_weights=True)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["reference", "tile loop"])
def test_the_density_term_does_not_see_a_constant_added_to_the_whole_mask(path):
    """Its column sums lost their logs to rounding under float32's lowest value: outputs 0.28 off."""
    q, k, v = qkv(dtype=torch.float32)
    mask = torch.zeros(6)
    with on_path(path) as backend:
        plain, offset = (
            fractional_attention(q, k, v, density_a=1.0, attn_mask=m, backend=backend)
            for m in (mask, mask + torch.finfo(torch.float32).min)
        )
    torch.testing.assert_close(offset, plain, rtol=1e-5, atol=1e-5)
