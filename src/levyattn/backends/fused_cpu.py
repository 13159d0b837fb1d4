"""The tiled backend's fused CPU kernel (``csrc/fna_cpu.cpp``): Euclidean FNA with float alpha and
bandwidth and no density term, forward and backward in (query block x key block) tiles that stay
in cache through both matmuls and the kernel, as PyTorch's own CPU kernel for
``scaled_dot_product_attention`` does. Memory is linear in sequence length: the output, the row
log-sum-exp and per-thread tile buffers.

The C++ source is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler with
OpenMP and ninja, a dependency; about 30 s once, announced at INFO on the ``levyattn`` logger,
which the CLI shows). The build is cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) in a folder named by a hash of the source, the compiler flags and
the torch and Python versions, compiled from a copy of the source in that folder: checkouts with
the same source share one build, and other versions keep their own instead of rebuilding over
each other's.
:func:`ensure_built` builds it up front (call it before timing anything). ``LEVYATTN_COMPILE=0``
turns it off; where the build fails the tiled backend warns once and runs its tile loop, the same
math, slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from levyattn.backends.common import AttentionCall
from levyattn.io import atomic_write_bytes

_SOURCE = Path(__file__).with_name("csrc") / "fna_cpu.cpp"
_DTYPES = (torch.float32, torch.float64)
# Vector instructions for ATen's Vectorized<T>, by the capability PyTorch detected at run time.
_ARCH_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
# Tile sizes as PyTorch's CPU attention kernel (query rows by query length, 512 keys): a
# (256 x 512) float32 tile is 512 KiB, in a core's L2 cache with the matmul operands.
KEY_BLOCK = 512


def query_block(nq: int) -> int:
    """Query rows per tile for ``nq`` queries."""
    return 256 if nq >= 768 else 64 if nq >= 192 else 32


_state: dict[str, object] = {}  # "ops" once built and loaded, or "failed": the reason
_log = logging.getLogger(__name__)


def _extension_name(source: bytes, cflags: list[str], ldflags: list[str]) -> str:
    """``levyattn_fna_cpu_<hash>``: torch keys its build folder by the name alone, so the name
    carries everything the build depends on: the source, the flags, the torch and Python versions
    and the compiler."""
    digest = hashlib.sha256(source)
    for part in (*cflags, "|", *ldflags, "|", torch.__version__, sys.version, os.environ.get("CXX", "")):
        digest.update(part.encode() + b"\0")
    return f"levyattn_fna_cpu_{digest.hexdigest()[:16]}"


def _ops():
    """The compiled ops (``torch.ops.levyattn_fna_cpu``), built on the first call; None if the
    build failed (warned once)."""
    if "ops" in _state or "failed" in _state:
        return _state.get("ops")
    from torch.utils.cpp_extension import get_default_build_root, load

    cflags = ["-O3", "-fopenmp", *_ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    ldflags = ["-fopenmp"]
    source = _SOURCE.read_bytes()
    name = _extension_name(source, cflags, ldflags)
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    built = (build_dir / f"{name}.so").is_file()
    if not built:
        _log.info("building the CPU kernel once (about 30 s; cached in %s)", build_dir)
    started = time.perf_counter()
    path = os.environ.get("PATH", "")
    try:
        # torch runs `ninja` from PATH; the ninja wheel (a dependency) keeps its binary in its
        # package, which is not on PATH when the venv's python runs without the venv activated.
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:
        pass
    try:
        # ninja rebuilds when the source path in its build file changes: every checkout compiles the
        # same copy. Written once (atomically); rewriting it would bump its mtime and rebuild.
        copy = build_dir / _SOURCE.name
        if not copy.is_file():
            atomic_write_bytes(copy, source)
        load(
            name=name,
            sources=[str(copy)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            is_python_module=False,
        )
        _state["ops"] = torch.ops.levyattn_fna_cpu
        if not built:
            _log.info("built the CPU kernel in %.0f s", time.perf_counter() - started)
    except Exception as err:  # no compiler, no OpenMP, a BLAS without sgemm_: the tile loop is the same math
        _state["failed"] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"levyattn: building the fused CPU kernel failed ({str(_state['failed'])[:300]}); the tiled backend "
            "runs its tile loop instead (slower, same results). Set LEVYATTN_COMPILE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
    finally:
        os.environ["PATH"] = path
    return _state.get("ops")


def ensure_built() -> bool:
    """Build (the first time on this machine, about 30 s) and load the kernel now; whether it is
    available. Call it before timing anything on the CPU, so the timing does not include the build.
    False without building when ``LEVYATTN_COMPILE=0``; a failed build warns once."""
    return os.environ.get("LEVYATTN_COMPILE", "1") != "0" and _ops() is not None


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a Euclidean call with float alpha and bandwidth and no density term (the caller
    checks those) on ``device`` in ``dtype`` runs here: CPU, float32 or float64, allowed, not
    inside a graph being compiled, and the kernel built."""
    return device.type == "cpu" and dtype in _DTYPES and not torch.compiler.is_compiling() and ensure_built()


def peaks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """(the largest magnitude in q and k, the largest in v) of CPU float32/float64 tensors, each
    ``inf`` where an entry is NaN or infinite: one read of each, one call (the kernel must be
    built: :func:`applies`)."""
    return _state["ops"].peaks(q, k, v)


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, exponent: float, c: float):
    """(output, the largest magnitude in q and k, the largest in v) of one query row (B, H, 1, d)
    against at least one key, without autograd; each magnitude ``inf`` where an entry is NaN or
    infinite, taken as the kernel reads every entry: a decoding step and its non-finite check
    read the key/value cache once."""
    flags = (exponent, c, call.is_gaussian, call.is_causal, call.exclude_self, KEY_BLOCK)
    return _state["ops"].decode(q, k, v, call.attn_mask, *flags)


class _FusedFNA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, *flags):
        out, lse, shift = _state["ops"].forward(q, k, v, mask, None, *flags)
        ctx.save_for_backward(q, k, v, out, lse, mask, shift)
        ctx.flags = flags
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # The shift is a constant: the gradients for the shifted q and k are those for q and k.
        q, k, v, out, lse, mask, shift = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[3]
        grad_q, grad_k, grad_v, grad_mask = _state["ops"].backward(
            grad_out, q, k, v, out, lse, mask, shift, *ctx.flags, mask_grad
        )
        # dS is (B, H, Nq, Nk): summed over the dimensions the mask was broadcast along.
        grad_mask = grad_mask.sum_to_size(mask.shape) if mask_grad else None
        return grad_q, grad_k, grad_v, grad_mask, *(None for _ in ctx.flags)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, exponent: float, c: float):
    """FNA output (B, H, Nq, dv) of q (B, H, Nq, d), k (B, H, Nk, d) and v (B, H, Nk, dv);
    ``log Phi = -exponent log1p(c sqrt(sq))`` (alpha < 2) or ``-c sq`` (alpha = 2).

    The kernel takes the call's 4-D mask as it is, bool or additive, and shifts q and k by the
    centre of the keys in use (all, or those the mask keeps for some query: the centring of
    :meth:`AttentionCall.prepare`, :func:`kernels.key_center`), tile by tile, without copies. It
    reads q, k, v in place when their rows are contiguous (the views of a packed projection) and
    lays the output out as (B, Nq, H, dv), so that merging its heads is a view. A float mask that
    requires grad gets it."""
    flags = (exponent, c, call.is_gaussian, call.is_causal, call.exclude_self, query_block(q.shape[-2]), KEY_BLOCK)
    mask = call.attn_mask
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, mask)):
        return _FusedFNA.apply(q, k, v, mask, *flags)
    return _state["ops"].forward(q, k, v, mask, None, *flags)[0]  # inference: without autograd's bookkeeping
