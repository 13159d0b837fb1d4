"""Attention rows without materialising attention: a transformers attention function for the lens.

The lens reads a handful of query rows per pass (the published protocol: one row per distance).
Running a model with ``attn_implementation="eager"`` and ``output_attentions=True`` builds every
layer's full (B, H, L, L) weights and keeps them all until the pass ends. Instead, importing this
module registers ``"levyattn_lens_rows"`` in transformers' attention registry
(``AttentionInterface``, with ``sdpa``'s boolean masks). The registered function

- returns the model's attention output from fused ``scaled_dot_product_attention`` (or, for a
  model with logit softcapping, which SDPA cannot apply, from the same softmax computed one block
  of queries at a time), so the pass costs what inference costs;
- and, while :func:`capture_rows` is active, computes the softmax weights of the requested query
  rows only, in the log domain, with the model's own mask (causal, padding, sliding window),
  ``scaling``, grouped-query heads, position bias and softcapping, and hands each layer's
  (B, H, R, Lk) rows to a callback (one call per attention layer, in the order the layers run).

A model whose attention is levyattn's FNA (``attn_implementation="fna"``) is not a softmax model:
its rows come from ``"levyattn_lens_fna_rows"`` instead, which returns the output of the model's
own FNA call and computes the FNA weights of the requested rows with levyattn's reference kernel
(:func:`~levyattn.integrations.hf_attention.fna_attention_forward` asked for weights), from the
model's ``fna_*`` settings and masks. FNA's weights depend on one row's logits only, except with
the density normalisation (``fna_density_a`` > 0), whose column sums span every query: a model
that sets it gets each layer's whole (B, H, L, L) weights, one layer at a time, and their rows.

Models that do not dispatch through transformers' attention registry (e.g. BLOOM) never call
the function (``RowCapture.calls`` stays 0), and the lens then keeps the eager path.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from levyattn.backends.common import apply_mask, log_softmax_rows
from levyattn.integrations.hf_attention import fna_attention_forward
from levyattn.integrations.hf_settings import validate_fna_config

try:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("levyattn.lens.capture needs transformers >= 5.0 (pip install 'levyattn[hf]')") from exc

__all__ = [
    "FNA_ROWS_IMPLEMENTATION",
    "ROWS_IMPLEMENTATION",
    "RowCapture",
    "capture_rows",
    "fna_row_weights",
    "fna_rows_attention_forward",
    "register",
    "row_weights",
    "rows_attention_forward",
]

ROWS_IMPLEMENTATION = "levyattn_lens_rows"
FNA_ROWS_IMPLEMENTATION = "levyattn_lens_fna_rows"
#: Queries per block when the output itself is computed here (softcapped models): bounds the
#: temporary logits to (B, H, block, Lk).
OUTPUT_BLOCK = 256


@dataclass
class RowCapture:
    """What to record during a pass: query positions ``rows`` (R,), the per-layer callback, and how
    many attention calls went through the registered function (``calls``)."""

    rows: torch.Tensor
    consume: Callable[[torch.Tensor], None]
    calls: int = 0


_ACTIVE: contextvars.ContextVar[RowCapture | None] = contextvars.ContextVar("levyattn_lens_rows", default=None)


@contextlib.contextmanager
def capture_rows(rows: torch.Tensor, consume: Callable[[torch.Tensor], None]) -> Iterator[RowCapture]:
    """Within the block, every call of :func:`rows_attention_forward` passes its (B, H, R, Lk) rows to ``consume``."""
    capture = RowCapture(rows=rows, consume=consume)
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


def _causal(module: torch.nn.Module, mask: Any, is_causal: bool | None, q_len: int) -> bool:
    # As transformers' sdpa integration: causality by flag only without a mask and with more than one query.
    flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(flag) and mask is None and q_len > 1


def row_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    causal: bool,
    scaling: float | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax weights of the query positions ``rows``: (B, H, R, Lk), in float32 (float64 for float64 inputs).

    query (B, H, Lq, d); key (B, Hkv, Lk, d) with H % Hkv == 0 (query head ``h`` reads kv head
    ``h // (H / Hkv)``, as ``repeat_kv``); attention_mask None, bool (True = keep) or additive
    float, broadcastable to (B, H, Lq, Lk); ``causal`` (only without a mask) keeps keys
    ``j <= i``. Logits ``q k^T * scaling`` (default ``d^-0.5``), then ``softcap * tanh(logits /
    softcap)``, then the bias and the mask, then a log-softmax; a row with no key left is all zeros.
    """
    b, heads, _, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query has {heads} heads, not a multiple of the key's {kv_heads} heads")
    rows = rows.to(query.device)
    dtype = torch.promote_types(query.dtype, torch.float32)
    scale = scaling if scaling is not None else dim**-0.5
    # Grouped-query heads: the R rows of the query heads sharing a kv head form one (group * R, d)
    # block against that kv head's keys, so the keys are never repeated to H heads.
    q = query.index_select(2, rows).to(dtype).reshape(b, kv_heads, -1, dim)
    logits = (q @ key.to(dtype).transpose(-1, -2)).view(b, heads, rows.numel(), n_keys) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if position_bias is not None:
        logits = logits + _select_rows(position_bias, rows).to(dtype)
    if attention_mask is not None:
        logits = apply_mask(logits, _select_rows(attention_mask, rows))
    elif causal:
        keys = torch.arange(n_keys, device=logits.device)
        logits = logits.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    return torch.exp(log_softmax_rows(logits))


def _select_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A (..., Lq, Lk) mask or bias at the query positions ``rows``; a broadcast query axis stays."""
    return t if t.shape[-2] == 1 else t.index_select(-2, rows.to(t.device))


def rows_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (attn_output (B, Lq, H, dv), None).

    query (B, H, Lq, d), key/value (B, Hkv, Lk, d). ``softcap`` and ``position_bias`` (kwargs)
    are applied; everything else is ``sdpa``'s behaviour.
    """
    softcap = kwargs.get("softcap")
    bias = kwargs.get("position_bias")
    q_len = query.shape[2]
    causal = _causal(module, attention_mask, is_causal, q_len)
    if causal and key.shape[2] > q_len:  # an empty static cache's future slots, as sdpa cuts them
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        bias = bias[..., :q_len] if bias is not None else None
    common = dict(causal=causal, scaling=scaling, softcap=softcap, position_bias=bias)
    capture = _ACTIVE.get()
    if capture is not None:
        capture.calls += 1
        capture.consume(row_weights(query, key, attention_mask, capture.rows.to(query.device), **common))
    if softcap is None:
        kwargs.pop("output_attentions", None)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # SDPA has no softcapping: the same softmax, one block of queries at a time, grouped-query
    # heads against their kv head's values as in row_weights.
    b, heads, kv_heads = query.shape[0], query.shape[1], value.shape[1]
    blocks = []
    for start in range(0, q_len, OUTPUT_BLOCK):
        rows = torch.arange(start, min(start + OUTPUT_BLOCK, q_len), device=query.device)
        weights = row_weights(query, key, attention_mask, rows, **common).to(value.dtype)
        out = weights.view(b, kv_heads, -1, weights.shape[-1]) @ value
        blocks.append(out.view(b, heads, rows.numel(), value.shape[-1]))
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous(), None


def fna_row_weights(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """FNA weights of the query positions ``rows``, (B, H, R, Lk), as the model's own FNA call gives them.

    Arguments as :func:`~levyattn.integrations.hf_attention.fna_attention_forward` receives them
    (query (B, H, Lq, d), key/value (B, Hkv, Lk, d), the model's mask, ``module`` carrying the
    ``fna_*`` config). The rows are computed by FNA's reference kernel on the queries ``rows``
    alone, the causal pattern (without a mask) and the mask taken at those rows; with a density
    normalisation the whole layer is computed and its rows returned.
    """
    rows = rows.to(query.device)
    density = validate_fna_config(module.config)["fna_density_a"]
    if any(v != 0 for v in (density if isinstance(density, list) else [density])):  # some layer: all of them
        weights = fna_attention_forward(
            module, query, key, value, attention_mask, is_causal=is_causal, position_bias=position_bias,
            output_attentions=True,
        )[1]  # fmt: skip
        return weights.index_select(2, rows)
    q_len = query.shape[2]
    causal = _causal(module, attention_mask, is_causal, q_len)
    if causal and key.shape[2] > q_len:  # an empty static cache's future slots, as FNA cuts them
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = position_bias[..., :q_len] if position_bias is not None else None
    if attention_mask is not None:
        mask = _select_rows(attention_mask, rows)
    elif causal:
        mask = torch.arange(key.shape[2], device=query.device)[None, :] <= rows[:, None]  # (R, Lk), True = keep
    else:
        mask = None
    bias = _select_rows(position_bias, rows) if position_bias is not None else None
    _, weights = fna_attention_forward(
        module, query.index_select(2, rows), key, value, mask, is_causal=False, position_bias=bias,
        output_attentions=True,
    )  # fmt: skip
    return weights


def fna_rows_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own FNA call (its output, with its configured backend; ``kwargs`` are
    transformers' ``scaling``, ``dropout``, ``is_causal``, ...), and while :func:`capture_rows`
    is active the FNA weights of the captured rows (:func:`fna_row_weights`)."""
    capture = _ACTIVE.get()
    if capture is not None:
        capture.calls += 1
        rows = fna_row_weights(
            module, query, key, value, attention_mask, capture.rows, is_causal=kwargs.get("is_causal"),
            position_bias=kwargs.get("position_bias"),
        )  # fmt: skip
        capture.consume(rows)
    return fna_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register(name: str = ROWS_IMPLEMENTATION, fna_name: str = FNA_ROWS_IMPLEMENTATION) -> None:
    """Register the row-capturing attentions as ``attn_implementation=name`` (softmax models) and
    ``fna_name`` (FNA models), both with ``sdpa``'s masks (done on import)."""
    AttentionInterface.register(name, rows_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    AttentionInterface.register(fna_name, fna_rows_attention_forward)
    AttentionMaskInterface.register(fna_name, sdpa_mask)


register()
