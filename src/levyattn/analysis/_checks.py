"""Validation shared by every analysis: what a row-stochastic (..., N, N) input must satisfy.

Conventions
-----------
- ``P`` is a torch tensor or a numpy array of shape (..., N, N); every analysis computes in
  float64 numpy on the CPU (eigen-solvers and graph algorithms need it), whatever came in.
- Row ``i`` is the distribution of query ``i`` over keys: ``P[..., i, :]`` sums to 1.
- ``mask`` is boolean with **True = valid token** (note: the opposite of
  ``nn.MultiheadAttention``'s ``key_padding_mask``): (N,), shared by every matrix, or
  ``P.shape[:-1]`` with any of its leading sizes 1 (e.g. (B, 1, N) for (B, H, N, N)).
  ``lengths`` says the first ``lengths`` tokens are valid: a scalar or ``P.shape[:-2]``,
  sizes of 1 allowed (e.g. (B, 1)). Give one or neither. A (B, N) mask or (B,) lengths for
  (B, H, N, N) is refused: numpy would align it with the heads, not the batch.
- Rows that pass the check are **renormalised** to sum to 1 exactly: the rounding that
  ``atol`` lets through (~4e-3 in bfloat16) would otherwise move a mixing time by 15%.
  With a mask, ``P`` is first restricted to the valid rows and columns (the walk
  conditioned to stay on valid tokens). Rows of padded tokens are not checked (they may be
  all zero, as FNA returns them).

Checks, in order, each naming what failed: type, dtype, shape (..., N, N), square, non-empty,
finite (no NaN/Inf), non-negative, rows summing to 1 within ``atol``. The default ``atol`` is
``ROW_SUM_ATOL`` (1e-3) for float32/float64 input and ``ROW_SUM_ATOL_LOW`` (1e-2) for
float16/bfloat16 input, whose rounding alone moves a row sum by up to ~4e-3.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ROW_SUM_ATOL = 1e-3
ROW_SUM_ATOL_LOW = 1e-2

_LOW_PRECISION_NAMES = ("float16", "bfloat16")


def to_numpy(x: object, name: str = "P") -> tuple[np.ndarray, bool]:
    """A torch tensor or numpy array -> (float64 numpy array, came-in-low-precision)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        low = str(x.dtype).removeprefix("torch.") in _LOW_PRECISION_NAMES
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        return x.detach().to(device="cpu", dtype=torch.float64).numpy(), low
    if isinstance(x, np.ndarray):
        if x.dtype == bool or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        return np.asarray(x, dtype=np.float64), x.dtype == np.float16
    raise TypeError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


@dataclass
class Prepared:
    """A validated batch: ``P`` (M, N, N) float64, ``valid`` (M, N) bool, ``batch_shape``."""

    P: np.ndarray
    valid: np.ndarray
    batch_shape: tuple[int, ...]
    all_valid: bool

    @property
    def n(self) -> int:
        return self.P.shape[-1]

    def matrices(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(flat index, restricted & renormalised (n_i, n_i) matrix, valid index array)``."""
        for m in range(self.P.shape[0]):
            idx = np.flatnonzero(self.valid[m])
            if self.all_valid:
                yield m, self.P[m], idx
                continue
            sub = self.P[m][np.ix_(idx, idx)]
            sums = sub.sum(axis=1, keepdims=True)
            yield m, sub / sums, idx


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _valid_mask(mask: object, lengths: object, shape: tuple[int, ...]) -> np.ndarray | None:
    """(..., N) bool of valid tokens broadcast to ``shape[:-1]``, or None when all are valid."""
    if mask is not None and lengths is not None:
        raise ValueError("give mask or lengths, not both")
    lead, n = shape[:-2], shape[-1]
    if mask is not None:
        arr, _ = _as_array(mask, "mask")
        if arr.dtype != bool:
            raise TypeError(f"mask must be boolean (True = valid token), got dtype {arr.dtype}")
        if arr.ndim < 1 or arr.shape[-1] != n:
            raise ValueError(f"mask must have shape (..., N) with N = {n}, got {tuple(arr.shape)}")
        if arr.ndim not in (1, len(lead) + 1):
            raise ValueError(
                f"mask of shape {tuple(arr.shape)} is ambiguous for P of shape {shape}: give (N,) = ({n},) or one "
                f"entry per leading dim, {lead + (n,)} with sizes of 1 allowed (for (B, H, N, N) a per-batch "
                "mask is (B, 1, N)); numpy would align its first dim with the last batch dim"
            )
        try:
            return np.broadcast_to(arr, lead + (n,))
        except ValueError:
            raise ValueError(f"mask of shape {tuple(arr.shape)} does not broadcast to {lead + (n,)}") from None
    if lengths is not None:
        arr, _ = _as_array(lengths, "lengths")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
        if arr.ndim not in (0, len(lead)):
            raise ValueError(
                f"lengths of shape {tuple(arr.shape)} is ambiguous for P of shape {shape}: give a scalar or one "
                f"entry per leading dim, {lead} with sizes of 1 allowed (for (B, H, N, N) per-batch lengths are "
                "(B, 1)); numpy would align its first dim with the last batch dim"
            )
        if arr.size and (arr.min() < 1 or arr.max() > n):
            raise ValueError(f"lengths must lie in [1, N = {n}], got values in [{arr.min()}, {arr.max()}]")
        try:
            arr = np.broadcast_to(arr, lead)
        except ValueError:
            raise ValueError(f"lengths of shape {tuple(arr.shape)} does not broadcast to batch shape {lead}") from None
        return np.arange(n) < arr[..., None]
    return None


def _as_array(x: object, name: str) -> tuple[np.ndarray, bool]:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy(), False
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, np.ndarray):
        return x, False
    raise TypeError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")


def prepare(
    P: object,
    mask: object = None,
    lengths: object = None,
    atol: float | None = None,
    name: str = "P",
) -> Prepared:
    """Validate ``P`` (..., N, N) and return it flattened to (M, N, N) with its valid tokens."""
    arr, low = to_numpy(P, name)
    shape = tuple(arr.shape)
    if arr.ndim < 2:
        raise ValueError(f"{name} must have shape (..., N, N); got shape {shape} ({arr.ndim}-D) [check: shape]")
    if shape[-1] != shape[-2]:
        raise ValueError(f"{name} must be square in its last two dims (..., N, N); got shape {shape} [check: square]")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: shape {shape} [check: non-empty]")
    if atol is None:
        atol = ROW_SUM_ATOL_LOW if low else ROW_SUM_ATOL
    if not (isinstance(atol, (int, float)) and atol > 0 and np.isfinite(atol)):
        raise ValueError(f"atol must be a finite number > 0, got {atol!r}")
    valid = _valid_mask(mask, lengths, shape)
    n = shape[-1]
    batch_shape = shape[:-2]
    flat = arr.reshape((-1, n, n))
    valid_flat = np.ones(flat.shape[:2], dtype=bool) if valid is None else np.ascontiguousarray(valid).reshape(-1, n)

    if valid is not None:
        empty = ~valid_flat.any(axis=1)
        if empty.any():
            where = _index(int(np.flatnonzero(empty)[0]), batch_shape)
            raise ValueError(f"{name}: matrix {where} has no valid token under the mask [check: non-empty]")
    # Only the valid block is checked: padded rows/cols may hold anything finite or not.
    checked = flat if valid is None else np.where(valid_flat[:, :, None] & valid_flat[:, None, :], flat, 0.0)
    bad = ~np.isfinite(checked)
    if bad.any():
        first = _index(int(np.flatnonzero(bad)[0]), flat.shape)
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite entries (NaN or Inf); first at (matrix {first[0]}, row "
            f"{first[1]}, col {first[2]}) [check: finite]"
        )
    if (checked < 0).any():
        pos = int(np.argmin(checked))
        first = _index(pos, flat.shape)
        raise ValueError(
            f"{name} has negative entries (min {checked.ravel()[pos]:.3g} at matrix {first[0]}, row {first[1]}, "
            f"col {first[2]}); a transition matrix needs P >= 0 [check: non-negative]"
        )
    sums = flat.sum(axis=-1)
    off = np.abs(sums - 1.0) > atol
    off &= valid_flat
    if off.any():
        m, i = np.unravel_index(int(np.flatnonzero(off)[0]), off.shape)
        raise ValueError(
            f"{name}: {int(off.sum())} rows do not sum to 1 within atol={atol:g}; row {i} of matrix "
            f"{_index(int(m), batch_shape)} sums to {sums[m, i]:.6g} [check: rows sum to 1]"
        )
    if valid is not None:
        kept = np.where(valid_flat[:, None, :], flat, 0.0).sum(axis=-1)
        lost = (kept <= 0) & valid_flat
        if lost.any():
            m, i = np.unravel_index(int(np.flatnonzero(lost)[0]), lost.shape)
            raise ValueError(
                f"{name}: valid row {i} of matrix {_index(int(m), batch_shape)} puts all its mass on masked tokens, "
                "so it cannot be renormalised [check: rows sum to 1 on valid tokens]"
            )
    all_valid = valid is None or bool(valid_flat.all())
    if all_valid:  # masked matrices are renormalised on their valid block in matrices()
        flat = flat / sums[..., None]
    return Prepared(P=flat, valid=valid_flat, batch_shape=batch_shape, all_valid=all_valid)


def finish(values: np.ndarray, batch_shape: tuple[int, ...]) -> float | np.ndarray:
    """(M, ...) per-matrix results -> batch_shape + (...); a single matrix's scalar as a float."""
    out = values.reshape(batch_shape + values.shape[1:])
    if out.ndim == 0:
        return float(out)
    return out


def check_rows(arr: np.ndarray, name: str = "T", atol: float = ROW_SUM_ATOL) -> np.ndarray:
    """Validate (M, N) transition rows (finite, >= 0, each summing to 1); return them as float64."""
    arr = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} has {bad} non-finite entries (NaN or Inf) [check: finite]")
    if (arr < 0).any():
        raise ValueError(f"{name} has negative entries (min {arr.min():.3g}) [check: non-negative]")
    sums = arr.sum(axis=-1)
    off = np.abs(sums - 1.0) > atol
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(f"{name}: row {i} sums to {sums[i]:.6g}, not 1 within atol={atol:g} [check: rows sum to 1]")
    return arr
