"""Differential harness: every backend computes ``reference``'s function, gradients included.

Hypothesis draws calls of ``fractional_attention``: shapes with empty and size-1 dimensions,
non-contiguous and broadcast (stride 0) q, k, v, float64 / float32 / bfloat16 / float16, alpha
and bandwidth as floats or per-head tensors (learnable or not), bool and float masks of every
broadcast shape (with -inf entries and rows offset by -1e9 or float32's lowest value; float ones
learnable), causal, exclude_self, the density term, the sphere, grad mode on or off, and
non-finite (NaN, +-Inf) entries in q, k, v and the mask. Each call goes to ``reference`` and to
every other path (``backend_paths.py``): the tile loop and the fused CPU kernel of ``tiled`` (in
tiles of 3 rows), ``sdpa``, ``flex`` (uncompiled) and ``auto``. A path either

- refuses with ``ValueError`` / ``TypeError`` and a reason (counted as refused), or
- returns ``reference``'s output and the gradients of every differentiable input: in float64
  to 1e-9 (relative to the largest value), NaN exactly where ``reference`` has NaN; in lower
  dtypes no NaN/Inf from finite inputs, and an error against ``reference`` in float64 (on the
  same rounded inputs) within the dtype's tolerance or within 4x that of ``reference`` itself.

Anything else (another exception, a different answer) fails the test; the harness counts
cases, agreements, refusals, silent wrong results and crashes, and prints them in pytest's
terminal summary (``tests/backends/conftest.py``).

Profiles: ``ci`` (the default) runs a fixed set of examples (``derandomize=True``);
``LEVYATTN_HYPOTHESIS_PROFILE=thorough`` runs many more, randomly seeded::

    LEVYATTN_HYPOTHESIS_PROFILE=thorough python -m pytest -q tests/backends/test_differential.py
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from backend_paths import PATHS, on_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from levyattn import fractional_attention

settings.register_profile(
    "ci", max_examples=500, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=10000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("LEVYATTN_HYPOTHESIS_PROFILE", "ci")

# Output tolerance relative to the largest reference value, and the gradients'.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (4e-3, 2e-2),
    torch.bfloat16: (2e-2, 1e-1),
}
COUNTS: collections.Counter = collections.Counter()


@st.composite
def calls(draw):
    """A call of fractional_attention as a dict: the leaves (tensors that may require grad), how
    to lay them out, and the keyword arguments."""
    dtype = draw(st.sampled_from([torch.float64] * 6 + [torch.float32] * 2 + [torch.float16, torch.bfloat16]))
    batch = draw(st.sampled_from([1, 2, 2, 0]))
    heads = draw(st.sampled_from([1, 2, 3, 3, 0]))
    nq = draw(st.integers(0, 9))
    nk = draw(st.integers(0, 9))
    d = draw(st.integers(1, 6))
    dv = draw(st.integers(0, 5))
    grad_mode = draw(st.booleans())
    manifold = draw(st.sampled_from(["euclidean", "euclidean", "sphere"]))
    kw = dict(
        manifold=manifold,
        rescale=draw(st.booleans()),
        is_causal=draw(st.booleans()),
        exclude_self=draw(st.booleans()),
        density_a=draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0])),
    )
    alpha_kind = draw(st.sampled_from(["float", "gaussian", "gaussian", "tensor", "learnable"]))
    alpha_value = draw(st.floats(0.3, 2.0))
    bandwidth_kind = draw(st.sampled_from(["float", "float", "tensor", "learnable"]))
    # 1e-12 at a small alpha puts the power law's scale eps**(-1/alpha) past float32's range: for a
    # float power-law alpha and without gradients (which are then of the order of that scale, and
    # so is their rounding). The Gaussian's logits -z**2 / eps would turn the rounding of z**2 (1e-16)
    # into 1e-4: a conditioning the tolerance cannot tell from a defect.
    tiny_bandwidth = not grad_mode and alpha_kind == "float" and alpha_value < 1.9
    bandwidth_value = draw(st.one_of(st.floats(0.2, 3.0), st.just(1e-12)) if tiny_bandwidth else st.floats(0.2, 3.0))
    mask_kind = draw(st.sampled_from([None, None, "bool", "float", "learnable"]))
    mask_shape = draw(st.sampled_from(["k", "qk", "b11k", "1hqk", "bhqk", "b1q1"]))
    # A constant added to some rows of a float mask, which the row normalisation removes: -1e9 and
    # float32's lowest value are how padding queries get masked in float masks.
    row_offset = draw(st.sampled_from([0.0] * 4 + [-1e9, torch.finfo(torch.float32).min]))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "broadcast"]))
    nonfinite = draw(st.sampled_from([None] * 5 + ["q", "k", "v", "mask"]))
    nonfinite_value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    # 1e20: squared distances, and the Gaussian's logits, past float32's range; without gradients,
    # which then grow with the coordinates (c |q - k|), and so does their rounding.
    scales = [1.0, 1.0, 0.01, 30.0] + ([] if grad_mode else [1e20])
    scale = draw(st.sampled_from(scales)) if dtype in (torch.float64, torch.float32) else 1.0
    seed = draw(st.integers(0, 2**31 - 1))

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # Leaves: q as (B, Nq, H, d) when transposed; k and v as (B, 1, Nk, .) when broadcast.
    leaves = {
        "q": randn(batch, nq, heads, d) if layout == "transposed" else randn(batch, heads, nq, d),
        "k": randn(batch, 1 if layout == "broadcast" else heads, nk, d),
        "v": randn(batch, 1 if layout == "broadcast" else heads, nk, dv),
    }
    leaves["q"], leaves["k"] = leaves["q"] * scale, leaves["k"] * scale
    learnable = {"q", "k", "v"} if grad_mode else set()
    kw["alpha"] = 2.0 if alpha_kind == "gaussian" else alpha_value
    if alpha_kind in ("tensor", "learnable"):
        leaves["alpha"] = (alpha_value + 0.5 * torch.rand(heads, generator=gen, dtype=torch.float64)).clamp_max(2.0)
        learnable |= {"alpha"} if alpha_kind == "learnable" and grad_mode else set()
    kw["bandwidth"] = bandwidth_value
    if bandwidth_kind in ("tensor", "learnable"):
        leaves["bandwidth"] = bandwidth_value + torch.rand(heads, generator=gen, dtype=torch.float64)
        learnable |= {"bandwidth"} if bandwidth_kind == "learnable" and grad_mode else set()
    if mask_kind is not None:
        shape = {
            "k": (nk,),
            "qk": (nq, nk),
            "b11k": (batch, 1, 1, nk),
            "1hqk": (1, heads, nq, nk),
            "bhqk": (batch, heads, nq, nk),
            "b1q1": (batch, 1, nq, 1),
        }[mask_shape]
        if mask_kind == "bool":
            leaves["mask"] = torch.rand(shape, generator=gen) > 0.3
        else:
            values = 2.0 * randn(*shape)
            offset_rows = torch.rand(shape[:-1] + (1,), generator=gen) < 0.5
            values = values + torch.where(offset_rows, row_offset, 0.0)
            leaves["mask"] = values.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
            learnable |= {"mask"} if mask_kind == "learnable" and grad_mode else set()
    if nonfinite is not None and nonfinite in leaves and leaves[nonfinite].is_floating_point():
        target = leaves[nonfinite]
        if target.numel():
            index = int(torch.randint(target.numel(), (1,), generator=gen))
            target.view(-1)[index] = nonfinite_value
    return dict(
        leaves=leaves,
        learnable=learnable,
        layout=layout,
        kw=kw,
        dtype=dtype,
        grad_mode=grad_mode,
        weight=randn(batch, heads, nq, dv),
    )


def _arguments(case, leaves):
    """fractional_attention's positional and keyword arguments from (fresh) leaves."""
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if case["layout"] == "transposed":
        q = q.transpose(1, 2)
    if case["layout"] == "broadcast":
        heads = q.shape[1]
        k, v = k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1)
    kw = dict(case["kw"])
    for name in ("alpha", "bandwidth"):
        if name in leaves:
            kw[name] = leaves[name]
    if "mask" in leaves:
        kw["attn_mask"] = leaves["mask"]
    return (q, k, v), kw


def _fresh_leaves(case, widen: bool):
    """The case's leaves in its dtype (q, k, v and a float mask; alpha and bandwidth stay
    float64), each a new leaf, learnable ones requiring grad. ``widen``: those values, rounded
    to the case's dtype, in float64."""
    out = {}
    for name, value in case["leaves"].items():
        x = value.detach().clone()
        if name in ("q", "k", "v") or (name == "mask" and x.is_floating_point()):
            x = x.to(case["dtype"])
            x = x.double() if widen else x
        out[name] = x.requires_grad_(name in case["learnable"])
    return out


def _run(case, path: str, widen: bool = False):
    """Output and gradients of the learnable leaves through ``path`` (``widen``: in float64 on
    the inputs rounded to the case's dtype); refusals raise."""
    leaves = _fresh_leaves(case, widen)
    args, kw = _arguments(case, leaves)
    with on_path(path) as backend, torch.set_grad_enabled(case["grad_mode"]):
        out = fractional_attention(*args, **kw, backend=backend)
        grads = {}
        if case["learnable"] and case["grad_mode"]:
            loss = (out.double() * case["weight"]).sum()
            names = sorted(case["learnable"])
            values = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            grads = dict(zip(names, values))
    return out.detach(), grads


def _error(got, want) -> float | str:
    """The largest difference of ``got`` from ``want`` relative to want's largest value (at
    least 1), or what differs otherwise: NaN or Inf at other places, a missing gradient."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else "gradient None on one side only"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    got, want = got.double(), want.double()
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return "NaN at other places than reference"
    infinite = torch.isinf(want)
    if not torch.equal(torch.isinf(got), infinite) or not torch.equal(got[infinite], want[infinite]):
        return "Inf at other places than reference"
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    scale = max(1.0, float(want[finite].abs().max()))
    return float((got[finite] - want[finite]).abs().max()) / scale


def _agree(name: str, got, want, exact, tolerance: float) -> str | None:
    """None when ``got`` matches ``want`` (reference in the case's dtype): its error against
    ``exact`` (reference in float64) is within ``tolerance``, or within 4x reference's own."""
    if got is not None and want is not None and got.dtype != want.dtype:
        return f"{name}: dtype {got.dtype}, reference {want.dtype}"
    err, own = _error(got, exact), _error(want, exact)
    if isinstance(err, str):
        return f"{name}: {err}"
    bound = max(tolerance, 4 * own) if isinstance(own, float) else tolerance
    return None if err <= bound else f"{name}: error {err:.3g} > {bound:.3g}"


def _finite_inputs(case) -> bool:
    """Whether every input is finite (a mask's -inf, which removes a pair, counts as finite)."""
    for name, value in case["leaves"].items():
        if value.is_floating_point():
            finite = value if name != "mask" else value.masked_fill(value == float("-inf"), 0.0)
            if not torch.isfinite(finite).all():
                return False
    return True


@settings(settings.get_profile(PROFILE))
@given(case=calls())
def test_every_backend_computes_the_reference_function(case):
    COUNTS["cases"] += 1
    ref_out, ref_grads = _run(case, "reference")
    exact_out, exact_grads = (ref_out, ref_grads) if case["dtype"] == torch.float64 else _run(case, "reference", True)
    out_tol, grad_tol = TOLERANCE[case["dtype"]]
    finite_inputs = _finite_inputs(case)
    if finite_inputs:
        assert torch.isfinite(ref_out).all(), "reference: NaN/Inf from finite inputs"
    problems = []
    for path in PATHS:
        try:
            out, grads = _run(case, path)
        except (ValueError, TypeError) as err:
            assert str(err), f"{path}: refused without a reason"
            COUNTS[f"refused ({path})"] += 1
            continue
        except Exception as err:  # a crash: counted, then reported
            COUNTS["crashes"] += 1
            problems.append(f"{path}: {type(err).__name__}: {err}")
            continue
        found = [_agree("output", out, ref_out, exact_out, out_tol)]
        if finite_inputs and not all(torch.isfinite(x).all() for x in (out, *grads.values()) if x is not None):
            found.append("NaN/Inf from finite inputs")
        found += [_agree(f"grad {n}", grads.get(n), g, exact_grads.get(n), grad_tol) for n, g in ref_grads.items()]
        found = [f"{path}: {f}" for f in found if f]
        if found:
            COUNTS["silent wrong results"] += 1
            problems += found
        else:
            COUNTS[f"agreed ({path})"] += 1
    summary = {k: (tuple(v.shape), str(v.dtype)) for k, v in case["leaves"].items()}
    assert not problems, f"{problems}\ncase: {case['kw']} {summary} {case['layout']} {case['dtype']}"


@pytest.fixture(scope="module", autouse=True)
def _zero_counts():
    COUNTS.clear()
    yield
