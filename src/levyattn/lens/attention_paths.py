"""Where the lens gets its attention rows: one way per kind of model.

- ``row_path``: a Hugging Face model whose attention goes through transformers' registry runs
  its own fused attention for the outputs, and :mod:`levyattn.lens.capture` computes only the
  query rows the protocol reads;
- ``eager_path``: any other Hugging Face model returns its full (B, H, L, L) weights through
  the eager implementation, and the rows are read from them;
- ``full_matrix_path``: a plain ``attentions_fn(ids)`` giving full matrices per layer.

Each gives an :class:`AttentionPath`, which :func:`levyattn.lens.measure.measure_decay` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from levyattn.lens.loading import attention_body, ensure_eager, extract_attentions, switch_to_rows

__all__ = ["AttentionPath", "eager_path", "full_matrix_path", "is_causal_attention", "row_path"]


@dataclass
class AttentionPath:
    """How a pass yields attention rows: ``run(ids (B, L), rows (R,), consume)`` calls
    ``consume`` with each layer's (B, H, R, L) weights, in layer order.

    ``path``: "rows" (the registered row-capturing attention, fused outputs), "eager"
    (``output_attentions`` of the eager implementation) or "attentions_fn"; ``note`` says why
    a Hugging Face model is not on "rows"; ``probe_weights``: each layer's (1, H, L, L) weights
    on the probe pass that chose the path, when one ran (reused by :func:`is_causal_attention`).
    """

    run: Callable[[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], None]], None]
    path: str
    forward_module: str
    note: str = ""
    probe_weights: list[torch.Tensor] | None = None


def full_matrix_path(attn_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]], name: str) -> Callable:
    """A ``run`` reading rows from whole (B, H, L, L) matrices (eager weights or an attentions_fn)."""

    def run(ids: torch.Tensor, rows: torch.Tensor, consume: Callable[[torch.Tensor], None]) -> None:
        layers = [a for a in attn_fn(ids) if a is not None]
        if not layers:
            raise ValueError(f"{name} returned no attention weights")
        b, n = ids.shape
        for i, a in enumerate(layers):
            if a.ndim != 4 or a.shape[0] != b or a.shape[-1] != n or a.shape[-2] != n:
                raise ValueError(
                    f"{name}: attention of layer {i} has shape {tuple(a.shape)}, expected (B={b}, H, L={n}, L={n})"
                )
            consume(a[:, :, rows.to(a.device)])

    return run


def eager_path(model: nn.Module, name: str, note: str = "") -> tuple[AttentionPath, Callable[[], None]]:
    restore = ensure_eager(model)
    body = attention_body(model)
    kwargs: dict[str, Any] = {"output_attentions": True}
    if getattr(getattr(body, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False  # a KV cache is useless here and costs memory
    run = full_matrix_path(lambda ids: extract_attentions(body(input_ids=ids, **kwargs), name), name)
    return AttentionPath(run, "eager", type(body).__name__, note), restore


def row_path(model: nn.Module, name: str, probe: torch.Tensor) -> tuple[AttentionPath, Callable[[], None]]:
    """The row-capturing path when the model takes it (checked on ``probe``), else the eager path."""
    restore, why = switch_to_rows(model)
    if restore is None:
        return eager_path(model, name, why)
    from levyattn.lens.capture import capture_rows

    body = attention_body(model)
    kwargs = {"use_cache": False} if getattr(body.config, "use_cache", None) is not None else {}

    def run(ids: torch.Tensor, rows: torch.Tensor, consume: Callable[[torch.Tensor], None]) -> None:
        b, n = ids.shape

        def check(a: torch.Tensor) -> None:
            if a.shape[0] != b or a.shape[-1] != n:
                raise ValueError(f"{name}: attention rows of shape {tuple(a.shape)}, expected (B={b}, H, R, L={n})")
            consume(a)

        with capture_rows(rows, check) as capture:
            body(input_ids=ids, **kwargs)
        if capture.calls == 0:
            raise ValueError(f"{name}: no attention layer went through the row-capturing attention")

    probe_weights: list[torch.Tensor] = []
    try:  # every row of the probe: the same pass then tells whether the model is causal
        with capture_rows(torch.arange(probe.shape[1]), probe_weights.append) as capture:
            body(input_ids=probe, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure means: keep the eager path, and say why
        restore()
        return eager_path(model, name, f"the row-capturing attention failed on a probe pass: {err}")
    if capture.calls == 0:
        restore()
        return eager_path(model, name, f"{type(body).__name__} does not dispatch through transformers' "
                                             "attention functions")  # fmt: skip
    return AttentionPath(run, "rows", type(body).__name__, probe_weights=probe_weights), restore


def is_causal_attention(attention: AttentionPath, probe: torch.Tensor) -> bool:
    """Whether every layer's attention on ``probe`` (1, L) puts no weight above the diagonal.

    Reads the weights of the probe pass that chose the path when it kept them, else runs one.
    """
    layers = attention.probe_weights
    if not layers:
        layers = []
        attention.run(probe, torch.arange(probe.shape[1]), layers.append)
    upper = max(float(torch.triu(a.float(), diagonal=1).abs().max()) for a in layers)
    return upper <= 1e-6
