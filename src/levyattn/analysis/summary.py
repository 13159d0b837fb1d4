"""One JSON-serialisable summary of every layer and head of a batch of attention weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from levyattn.analysis._checks import _as_array, prepare, to_numpy
from levyattn.analysis.mixing import mixing_time
from levyattn.analysis.paths import path_lengths
from levyattn.analysis.spectral import spectral_gap

METRICS = (
    "spectral_gap",
    "mixing_steps",
    "mean_path_length",
    "diameter",
    "mean_hops",
    "diameter_hops",
    "row_entropy",
    "row_entropy_normalised",
)


def row_entropy(P: object, mask: object = None, *, lengths: object = None, atol: float | None = None):
    """Mean over valid rows of ``-sum_j P_ij log P_ij`` (nats), and the same divided by ``log n``.

    Returns two floats for one matrix, else two arrays of shape ``P.shape[:-2]``. The
    normalised entropy is 1 for uniform attention and 0 for one-hot rows (1 when n = 1).
    """
    prep = prepare(P, mask=mask, lengths=lengths, atol=atol)
    ent = np.empty(prep.P.shape[0])
    norm = np.empty(prep.P.shape[0])
    for m, sub, _ in prep.matrices():
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(sub > 0, sub * np.log(sub), 0.0)
        ent[m] = float(-terms.sum(axis=1).mean())
        n = sub.shape[0]
        norm[m] = ent[m] / math.log(n) if n > 1 else 1.0
    shape = prep.batch_shape
    if shape == ():
        return float(ent[0]), float(norm[0])
    return ent.reshape(shape), norm.reshape(shape)


def _json_number(x: float) -> float | None:
    """JSON has no inf/NaN: they become null (documented: null = infinite / undefined)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _as_bhnn(name: str, w: object) -> np.ndarray:
    arr, _ = to_numpy(w, f"weights[{name!r}]")
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[None]  # (H, N, N): one batch element
    elif arr.ndim != 4:
        raise ValueError(f"weights[{name!r}] must be (B, H, N, N), (H, N, N) or (N, N), got shape {tuple(arr.shape)}")
    return arr


def _as_mask(mask: object, B: int, N: int) -> np.ndarray | None:
    """(B, N) or (N,) bool, True = valid -> (B, 1, N) for broadcasting over heads."""
    if mask is None:
        return None
    arr, _ = _as_array(mask, "mask")
    if arr.dtype != bool:
        raise TypeError(f"mask must be boolean (True = valid token), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.shape[-1] != N or arr.shape[0] not in (1, B):
        raise ValueError(f"mask must be (B, N) = ({B}, {N}) or (N,), got {tuple(arr.shape)}")
    return arr[:, None, :]


def attention_summary(
    weights: object,
    mask: object = None,
    *,
    mixing: bool = True,
    paths: bool = True,
    atol: float | None = None,
) -> dict[str, Any]:
    """Gap, mixing steps, path lengths and row entropy for every layer, batch element and head.

    Args:
        weights: one attention tensor -- (B, H, N, N), (H, N, N) or (N, N), torch or numpy --
            or a mapping ``{layer name: tensor}`` / a sequence of tensors (named ``layer0``,
            ``layer1``, ...), e.g. a Hugging Face model's ``outputs.attentions``.
        mask: bool (B, N) or (N,), True = valid token, shared by every layer and head.
        mixing: False skips the mixing times (the costlier analyses).
        paths: False skips the shortest paths.

    Returns a dict (JSON-serialisable; ``null`` = infinite or undefined) with
    ``"records"`` (one per layer, batch element and head: every metric of ``METRICS`` plus
    ``n_valid`` and ``mixing_exact``), ``"heads"`` (per layer and head, means over the batch)
    and ``"layers"`` (per layer, means over batch and heads). A metric's null in a record is
    an infinity (a walk that never mixes, an unreachable pair), so a mean over records holding
    one is null too; ``"n_infinite"`` counts them per metric. Metrics not computed are null.
    """
    if isinstance(weights, Mapping):
        items = list(weights.items())
    elif isinstance(weights, (list, tuple)):
        items = [(f"layer{i}", w) for i, w in enumerate(weights)]
    else:
        items = [("attention", weights)]
    if not items:
        raise ValueError("weights is empty: no attention tensor to summarise")
    skipped = (() if mixing else ("mixing_steps",)) + (
        () if paths else ("mean_path_length", "diameter", "mean_hops", "diameter_hops")
    )
    computed = [key for key in METRICS if key not in skipped]
    records: list[dict[str, Any]] = []
    layers_meta = []
    for name, w in items:
        P = _as_bhnn(str(name), w)
        B, H, N, _ = P.shape
        m = _as_mask(mask, B, N)
        kw = dict(mask=m, atol=atol)
        gap = spectral_gap(P, **kw)
        ent, ent_n = row_entropy(P, **kw)
        if mixing:
            steps, exact = mixing_time(P, return_exact=True, **kw)
        if paths:
            weighted = path_lengths(P, kind="weighted", **kw)
            hops = path_lengths(P, kind="hops", **kw)
        n_valid = np.broadcast_to(m.sum(-1) if m is not None else np.array(N), (B, H))
        for b in range(B):
            for h in range(H):
                rec: dict[str, Any] = {"layer": str(name), "batch": b, "head": h, "n_valid": int(n_valid[b, h])}
                rec["spectral_gap"] = _json_number(gap[b, h])
                rec["mixing_steps"] = _json_number(steps[b, h]) if mixing else None
                rec["mixing_exact"] = bool(exact[b, h]) if mixing else None
                for key, res in (("mean_path_length", "w"), ("mean_hops", "h")):
                    obj = (weighted if res == "w" else hops) if paths else None
                    rec[key] = _json_number(obj.mean[b, h]) if obj else None
                    diameter_key = "diameter" if res == "w" else "diameter_hops"
                    rec[diameter_key] = _json_number(obj.diameter[b, h]) if obj else None
                rec["row_entropy"] = _json_number(ent[b, h])
                rec["row_entropy_normalised"] = _json_number(ent_n[b, h])
                records.append(rec)
        layers_meta.append({"name": str(name), "shape": [B, H, N, N]})
    return {
        "conventions": {
            "mask": "True = valid token; rows restricted to valid tokens and renormalised",
            "spectral_gap": "1 - |lambda_2|, lambda_2 the eigenvalue of second-largest modulus",
            "mixing_steps": "min t with max_i ||e_i P^t - pi||_TV <= 1/4; null = does not mix within 10000 steps",
            "mean_path_length": "mean shortest path over reachable ordered pairs, edge length -log P_ij",
            "mean_hops": "same, unweighted, edges with P_ij >= 1/n",
            "diameter": "null = some pair unreachable",
            "means": "per head and per layer; null when a record's value is infinite (n_infinite counts them)",
            "row_entropy": "mean over rows of -sum_j P_ij log P_ij (nats); normalised: divided by log n",
        },
        "layers": [
            dict(meta, **_means([r for r in records if r["layer"] == meta["name"]], computed))
            for meta in layers_meta
        ],
        "heads": [
            dict(layer=meta["name"], head=h, **_means(_select(records, meta["name"], h), computed))
            for meta in layers_meta
            for h in range(meta["shape"][1])
        ],
        "records": records,
    }


def _means(records: list[dict[str, Any]], computed: list[str]) -> dict[str, Any]:
    """Per metric the mean over ``records``: null when a record's value is (an infinity), or
    when the metric was not computed; ``n_infinite``: {metric: records with an infinity}."""
    out: dict[str, Any] = dict.fromkeys(METRICS)
    infinite = {}
    for key in computed:
        vals = [r[key] for r in records]
        n_inf = sum(v is None for v in vals)
        if n_inf:
            infinite[key] = n_inf
        elif vals:
            out[key] = float(np.mean(vals))
    out["n_infinite"] = infinite
    return out


def _select(records: list[dict[str, Any]], layer: str, head: int) -> list[dict[str, Any]]:
    return [r for r in records if r["layer"] == layer and r["head"] == head]
