"""The ``fna_*`` config keys and the attention modules that read them.

What the keys are (:data:`CONFIG_KEYS`, with their defaults), how a value is checked against a
config's layers and heads (:func:`validate_fna_config`, :func:`check_fna_settings`), and which
modules of a model call the registered attention function and at which layer index
(:func:`attention_modules`, :func:`assign_layer_indices`, :func:`layer_index`). Writing the keys
(:func:`~levyattn.integrations.hf_attention.configure_fna`) and reading one layer's values
(:func:`~levyattn.integrations.hf_attention.layer_settings`) are in
:mod:`levyattn.integrations.hf_attention`, which re-exports the public names here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from levyattn.config import FNAConfig, check_choice
from levyattn.functional import BACKENDS, fractional_attention

__all__ = [
    "CONFIG_KEYS",
    "assign_layer_indices",
    "attention_modules",
    "check_fna_settings",
    "layer_index",
    "num_layers",
    "validate_fna_config",
]

# Config key -> default: FNAConfig's kernel settings (its exclude_self has no key: causal and
# padding masks come from the model) and fractional_attention's backend.
CONFIG_KEYS: dict[str, Any] = {
    **{f"fna_{f.name}": f.default for f in dataclasses.fields(FNAConfig) if f.name != "exclude_self"},
    "fna_backend": inspect.signature(fractional_attention).parameters["backend"].default,
}
_PER_HEAD = ("fna_alpha", "fna_bandwidth")
_MODEL_WIDE = ("fna_backend",)
_LAYER_ATTR = "fna_layer_idx"


# ----------------------------------------------------------------------------- validation


def _check_kernel_field(name: str) -> Callable[[Any], Any]:
    """The check of ``fna_<name>``: FNAConfig's own check of its field ``name``."""

    def check(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            # Config values are JSON: a tensor would not survive save_pretrained.
            raise TypeError(f"FNA config values must be plain numbers or lists, got a tensor {tuple(value.shape)}")
        return getattr(FNAConfig(**{name: value}), name)

    return check


_CHECKERS: dict[str, Callable[[Any], Any]] = {
    **{key: _check_kernel_field(key.removeprefix("fna_")) for key in CONFIG_KEYS if key != "fna_backend"},
    "fna_backend": lambda v: check_choice("fna_backend", v, BACKENDS),
}


def num_layers(config: Any) -> int | None:
    """``config.num_hidden_layers`` where it is an int, else None."""
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _num_heads(config: Any) -> int | None:
    n = getattr(config, "num_attention_heads", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _check_key(key: str, value: Any, n_layers: int | None, n_heads: int | None) -> Any:
    """Validate one config value: scalar, per-layer list, or (alpha/bandwidth) per-layer per-head lists.

    Returns the value normalised to plain Python (floats, lists).
    """
    check = _CHECKERS[key]

    def scalar(v: Any, where: str) -> Any:
        try:
            return check(v)
        except (TypeError, ValueError) as err:
            raise type(err)(f"config.{key}{where}: {err}") from None

    if not isinstance(value, (list, tuple)):
        return scalar(value, "")
    if key in _MODEL_WIDE:
        raise TypeError(f"config.{key} takes one value for the whole model, got a list {value!r}")
    if n_layers is not None and len(value) != n_layers:
        raise ValueError(
            f"config.{key} has {len(value)} entries but the model has num_hidden_layers={n_layers}: "
            "give a scalar or one entry per layer"
        )
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, (list, tuple)):
            if key not in _PER_HEAD:
                raise TypeError(f"config.{key}[{i}] must be a scalar (only {_PER_HEAD} take per-head lists)")
            if n_heads is not None and len(entry) != n_heads:
                raise ValueError(
                    f"config.{key}[{i}] has {len(entry)} entries but the model has "
                    f"num_attention_heads={n_heads}: give a scalar or one value per head"
                )
            out.append([scalar(v, f"[{i}][{h}]") for h, v in enumerate(entry)])
        else:
            out.append(scalar(entry, f"[{i}]"))
    return out


def validate_fna_config(config: Any) -> dict[str, Any]:
    """Check every ``fna_*`` key of ``config`` and return them all, defaults filled in.

    Raises ``ValueError``/``TypeError`` naming the key, the offending value and the valid range.
    """
    n_layers, n_heads = num_layers(config), _num_heads(config)
    return {
        key: _check_key(key, getattr(config, key, default), n_layers, n_heads)
        for key, default in CONFIG_KEYS.items()
    }


def check_fna_settings(config: Any, **settings: Any) -> dict[str, Any]:
    """``settings`` (as :func:`configure_fna` takes them) checked against ``config``'s layers and
    heads, as ``{"fna_<name>": value}``; nothing is written."""
    n_layers, n_heads = num_layers(config), _num_heads(config)
    checked = {}
    for name, value in settings.items():
        key = f"fna_{name}"
        if key not in CONFIG_KEYS:
            valid = ", ".join(k.removeprefix("fna_") for k in CONFIG_KEYS)
            raise TypeError(f"configure_fna got an unknown setting {name!r}; valid settings: {valid}")
        checked[key] = _check_key(key, value, n_layers, n_heads)
    return checked


# ----------------------------------------------------------------------------- layers


def _is_attention_module(module: torch.nn.Module) -> bool:
    # The modules that call ``attention_interface(self, ...)`` in transformers v5 carry
    # ``config``, ``is_causal`` and ``scaling`` (BertSelfAttention, GPT2Attention, LlamaAttention,
    # ViTAttention, ...) or ``scale`` (CLIPAttention and the vision towers built on it); their
    # wrappers and the layers do not.
    return (
        hasattr(module, "config")
        and hasattr(module, "is_causal")
        and (hasattr(module, "scaling") or hasattr(module, "scale"))
    )


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that call the registered attention function, in module order
    (one per attention layer for the decoder-only and encoder-only models)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [module for module in model.modules() if _is_attention_module(module)]


def assign_layer_indices(model: torch.nn.Module) -> int:
    """Number the attention modules that carry no ``layer_idx`` (ViT-style), in module order,
    from 0 within each config they read (a vision tower and a text model are numbered apart).

    Sets ``module.fna_layer_idx`` so per-layer ``fna_*`` values reach them. Modules with a
    ``layer_idx`` keep it. Returns how many modules were numbered.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    counts: dict[int, int] = {}
    for module in model.modules():
        if _is_attention_module(module) and getattr(module, "layer_idx", None) is None:
            key = id(module.config)
            setattr(module, _LAYER_ATTR, counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
    return sum(counts.values())


def forget_layer_indices(model: torch.nn.Module) -> None:
    """Undo :func:`assign_layer_indices` on every module of ``model``."""
    for module in model.modules():
        module.__dict__.pop(_LAYER_ATTR, None)


def layer_index(module: torch.nn.Module) -> int | None:
    """The layer index an attention module's per-layer ``fna_*`` values are read at (None: none)."""
    idx = getattr(module, _LAYER_ATTR, None)
    if idx is None:
        idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) else None
