"""The attention implementation ``attn_implementation="fna"`` of Hugging Face ``transformers``.

The attention function transformers calls, the writing of its ``fna_*`` config keys
(:func:`configure_fna`) and the reading of one layer's values (:func:`layer_settings`), and its
registration. The keys themselves, their validation and the attention modules that read them are in
:mod:`levyattn.integrations.hf_settings`; the values of a T5-style model's stacks, kept through
``save_pretrained``, in :mod:`levyattn.integrations.hf_stacks`. This module re-exports their public
names; ``levyattn.integrations.huggingface`` re-exports the public names here (with
:func:`~levyattn.integrations.hf_convert.to_fna`); import either.

Registration
------------
Importing this module registers ``"fna"`` in transformers' attention registry
(``AttentionInterface``) and in its mask registry (``AttentionMaskInterface``).
:func:`register` does the same explicitly and returns the name (idempotent; ``register(name)``
registers FNA under another name too), for code that would rather not rely on an import's side
effect::

    from levyattn.integrations.huggingface import register
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register())  # "fna"
    model = AutoModel.from_pretrained(path, attn_implementation="fna")
    model.set_attn_implementation("fna")

Either way these work for every model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (BERT-style
encoders, GPT-2- and Llama-style decoders, ViT, and most other v5 architectures).
Trainer, ``generate`` (with its key/value cache) and ``save_pretrained`` keep working.

Hyperparameters: config keys
----------------------------
FNA reads its hyperparameters from the model config; they are plain JSON values, so
``save_pretrained`` / ``from_pretrained`` keep them. ``attn_implementation`` itself is not
saved by transformers: pass ``attn_implementation="fna"`` again when loading.

================  ===========  ==========================================================
key               default      meaning (see ``levyattn.fractional_attention``)
================  ===========  ==========================================================
fna_alpha         1.2          Lévy index in (0, 2]; per layer / per head
fna_bandwidth     1.0          eps > 0; per layer / per head
fna_manifold      "euclidean"  "euclidean" or "sphere"; per layer
fna_rescale       true         divide Euclidean distances by kappa; per layer
fna_d_intrinsic   null         d_M of the power law (null: head_dim, sphere head_dim - 1)
fna_sphere_radius 1.0          r > 0 on the sphere; per layer
fna_density_a     0.0          Coifman-Lafon density normalisation in [0, 1]; per layer;
                               encoders only (causal attention refuses it: causal_context)
fna_backend       "auto"       "auto", "reference", "tiled", "sdpa" or "flex"; whole model
================  ===========  ==========================================================

Each per-layer key takes a scalar (every layer), or a list with one entry per layer
(``config.num_hidden_layers``). ``fna_alpha`` and ``fna_bandwidth`` entries may
themselves be lists with one value per attention head (``config.num_attention_heads``).
:func:`configure_fna` validates and writes them; :func:`validate_fna_config` checks a
config read from disk.

The layer index comes from the attention module's ``layer_idx`` (BERT, GPT-2, Llama).
Modules without one (ViT) need :func:`assign_layer_indices` once after loading when a
key is given per layer (``to_fna`` does it); scalars need nothing.

Semantics of the registered function
------------------------------------
- ``scaling`` is ignored: FNA has its own distance scale (kappa and the bandwidth).
- Masks: the ``"fna"`` mask registration produces the boolean masks of ``sdpa``
  (True = keep) for causal, padding and sliding-window patterns; custom additive 4-D
  float masks are added to ``log Phi`` (values at or below half of ``finfo.min`` -- HF's
  stand-in for -inf -- are treated as -inf). With no mask, ``is_causal`` (the argument,
  else ``module.is_causal``) applies as in transformers' ``sdpa`` integration: with more keys
  than queries the first keys are kept (transformers omits the mask there only for an empty
  static cache, whose later slots are unwritten; new queries on a filled cache get a mask).
- Grouped-query attention: keys and values with fewer heads are repeated (``repeat_kv``).
- Attention weights are computed (with ``backend="reference"``) only when the caller
  asks for them (``output_attentions=True``); otherwise ``None`` is returned and the
  configured backend runs (``auto`` picks ``tiled`` for long sequences, memory linear in
  sequence length).
- Attention dropout (``module.training`` and ``dropout > 0``) is applied to the FNA
  weights, as eager attention does; that needs the materialised weights, so training with
  attention dropout uses the reference backend. Set the model's attention dropout to 0
  for long-sequence training.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from levyattn._extras import MissingExtraError
from levyattn.functional import fractional_attention
from levyattn.integrations.hf_settings import (
    CONFIG_KEYS,
    assign_layer_indices,
    attention_modules,
    check_fna_settings,
    forget_layer_indices,
    layer_index,
    validate_fna_config,
)
from levyattn.integrations.hf_stacks import STACKS_KEY, _own_stack, _StackValues, _unlinked, link_stacks

try:
    from transformers import PretrainedConfig
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError(
        "levyattn.integrations.huggingface needs transformers >= 5.0 with AttentionInterface and "
        "AttentionMaskInterface (pip install 'levyattn[hf]')"
    ) from exc

try:  # how v5 models collect attention weights (hooks on the attention modules); see _weights_requested
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers pass output_attentions instead
    _active_collector = None

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CONFIG_KEYS",
    "assign_layer_indices",
    "attention_modules",
    "causal_context",
    "check_fna_settings",
    "configure_fna",
    "fna_attention_forward",
    "layer_index",
    "layer_settings",
    "link_stacks",
    "register",
    "repeat_kv",
    "substitute_attention",
    "validate_fna_config",
]

ATTN_IMPLEMENTATION = "fna"

_CACHE_ATTR = "_levyattn_fna_cache"


# ----------------------------------------------------------------------------- configuration


def configure_fna(config: Any, **settings: Any) -> Any:
    """Validate FNA hyperparameters and write them as ``fna_*`` keys of ``config`` (returned).

    They are written to every config that takes them on: on a config holding sub-configs (a
    Llava's ``text_config`` and ``vision_config``, which its attention modules read) to those too,
    and on the top config of a converted T5 (its ``STACKS_KEY`` follows the stacks' configs) to
    every stack's config; passed a model, to the top config and every config its attention modules
    read (a sub-config none reads is left alone). Every value is checked against every such config
    (its depth and heads) before any is written. A config carrying ``STACKS_KEY`` as loaded is
    refused: pass the model, which links it (:func:`link_stacks`).

    Args:
        config: a ``transformers.PretrainedConfig``, or a model (its ``config`` and its attention
            modules' configs are written).
        settings: ``alpha``, ``bandwidth``, ``manifold``, ``rescale``, ``d_intrinsic``,
            ``sphere_radius``, ``density_a``, ``backend``. Each a scalar, a list with one entry
            per layer, and for alpha/bandwidth a list of per-head lists.
    """
    read: dict[int, tuple[str, Any]] = {}  # the configs the model's attention modules read, by id
    if isinstance(config, torch.nn.Module):
        model, config = config, getattr(config, "config", None)
        if config is None:
            raise TypeError("configure_fna needs a transformers config or a model with a .config")
        link_stacks(model)
        holders: dict[int, str] = {}  # each config's first holder in module order (the outermost)
        for path, module in model.named_modules():
            holders.setdefault(id(module.__dict__.get("config")), path)
        for module in attention_modules(model):
            path = holders[id(module.config)]
            read.setdefault(id(module.config), (f"model.{path}.config" if path else "model.config", module.config))
    if _unlinked(config):
        # A stack reads its fna_stacks entry, not its own keys, and save_pretrained writes the top
        # config, which a stack's copy no longer reaches: a key set here would be lost in silence.
        raise ValueError(
            f"this config carries {STACKS_KEY} as loaded from a saved T5-style model "
            f"(roles {sorted(getattr(config, STACKS_KEY))}): each stack reads its entry there from its own copy of "
            "the saved config, so an fna_* key set on this config would be ignored or lost on save_pretrained. "
            "Configure the model: configure_fna(model) links its stacks to the config it saves (each stack's "
            "values become its config's own keys), after which configure_fna(model.decoder.config, ...) "
            "(or model.encoder.config) takes effect and is saved"
        )
    top = "model.config" if read else "config"
    # No attention module reads the top config of a converted T5 or of a Llava: its stacks' configs
    # (a T5's copies, a Llava's sub-configs) take the values.
    stacks = getattr(config, STACKS_KEY, None)
    stacks = dict(zip(stacks, stacks.configs())) if isinstance(stacks, _StackValues) else {}
    subs = {id(c): (f"{top}.{name}", c) for name, c in _sub_configs(config)}
    targets = {id(config): (top, config)}
    # Passed a model, the configs its modules read are known: a sub-config none reads is left alone.
    targets.update({key: named for key, named in subs.items() if key in read or not read})
    targets.update({key: named for key, named in read.items() if key not in targets})
    targets.update({id(c): (f"the {role}'s config", c) for role, c in stacks.items() if id(c) not in targets})
    checked = []  # all before any write
    for name, target in targets.values():
        try:
            checked.append(check_fna_settings(target, **settings))
        except (TypeError, ValueError) as err:
            if len(targets) == 1:
                raise
            message = str(err)  # "config.fna_alpha ..." becomes "model.config.vision_config.fna_alpha ..."
            message = f"{name}.{message[7:]}" if message.startswith("config.") else f"{name}: {message}"
            raise type(err)(message) from None
    for (_, target), values in zip(targets.values(), checked):
        for key, value in values.items():
            setattr(target, key, value)
    return config


def _sub_configs(config: Any) -> list[tuple[str, Any]]:
    """The configs ``config`` holds as attributes (a Llava's ``text_config``, ``vision_config``),
    theirs in turn included, as ``(dotted attribute path, config)``."""
    found = []
    for name, value in getattr(config, "__dict__", {}).items():
        if isinstance(value, PretrainedConfig) and value is not config:
            found.append((name, value))
            found.extend((f"{name}.{path}", sub) for path, sub in _sub_configs(value))
    return found


def layer_settings(config: Any, layer_idx: int | None, num_heads: int | None = None) -> dict[str, Any]:
    """The keyword arguments of ``fractional_attention`` for one layer, from ``config``'s ``fna_*`` keys
    (its stack's, where the config carries ``STACKS_KEY``).

    Per-head alpha/bandwidth come back as lists (one float per head). ``layer_idx`` may be
    None only when no key is given per layer.
    """
    values = validate_fna_config(_own_stack(config))
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = key.removeprefix("fna_")
        if isinstance(value, list):
            if layer_idx is None:
                raise ValueError(
                    f"config.{key} gives one value per layer, but this attention module has no layer index: "
                    "call levyattn.integrations.huggingface.assign_layer_indices(model) once after loading"
                )
            if not 0 <= layer_idx < len(value):
                raise ValueError(f"config.{key} has {len(value)} entries; layer index {layer_idx} is out of range")
            value = value[layer_idx]
        if isinstance(value, list) and num_heads is not None and len(value) != num_heads:
            raise ValueError(
                f"config.{key}[{layer_idx}] has {len(value)} per-head values but the layer has {num_heads} heads"
            )
        kwargs[name] = value
    return kwargs


def _call_kwargs(module: torch.nn.Module, config: Any, heads: int, device: torch.device) -> dict[str, Any]:
    """``layer_settings`` with per-head lists as tensors on ``device``, cached on the module.

    The cache key holds the raw config values, so editing ``config.fna_*`` takes effect on
    the next call, and moving the model to another device rebuilds the tensors.
    """
    layer = layer_index(module)
    key = (layer, heads, str(device), tuple(repr(getattr(config, k, d)) for k, d in CONFIG_KEYS.items()),
           repr(getattr(config, STACKS_KEY, None)), getattr(config, "is_decoder", False))
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    kwargs = layer_settings(config, layer, heads)
    for name in ("alpha", "bandwidth"):
        if isinstance(kwargs[name], list):
            kwargs[name] = torch.tensor(kwargs[name], dtype=torch.float32, device=device)
    module.__dict__[_CACHE_ATTR] = (key, kwargs)
    return kwargs


def forget_module_state(model: torch.nn.Module) -> None:
    """Remove what levyattn keeps on ``model``'s modules: the layer numbers of
    :func:`assign_layer_indices` and each attention module's cached call settings."""
    forget_layer_indices(model)
    for module in model.modules():
        module.__dict__.pop(_CACHE_ATTR, None)


# ----------------------------------------------------------------------------- the function


#: Why density normalisation is refused where attention is causal (its sentence in the errors).
DENSITY_IN_DECODER = (
    "density normalisation divides each key's weights by its column sum over all queries, so every "
    "token's output would depend on the tokens after it (and decoding with a key/value cache would give "
    "other outputs than the full pass); use density_a = 0 there"
)


def causal_context(module: torch.nn.Module, is_causal: bool | None = None) -> bool:
    """Whether ``module`` attends causally: its ``is_causal`` (or the call's), or it belongs to a
    decoder (``is_decoder`` on the module or its config: a decoder's cross-attention is not causal
    itself, but its queries are the decoder's tokens, which must not see later ones)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)  # as the forward
    config = getattr(module, "config", None)
    return bool(causal) or bool(getattr(module, "is_decoder", False)) or bool(getattr(config, "is_decoder", False))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, N, d) -> (B, Hkv * n_rep, N, d), each kv head repeated n_rep times (HF's repeat_kv)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def _prepare_mask(mask: Any, nk: int) -> torch.Tensor | None:
    """HF's mask -> levyattn's: bool stays (True = keep); float stays additive with finfo.min as -inf."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a tensor or None for attn_implementation='fna', got {type(mask).__name__} "
            "(BlockMask belongs to flex_attention)"
        )
    if mask.dim() >= 2 and mask.shape[-1] > nk:
        # Static caches build masks for their full length; the keys are sliced the same way by eager.
        mask = mask[..., :nk]
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool or floating, got dtype {mask.dtype}")
    # HF writes finfo(dtype).min for "masked"; as -inf the pair is exactly removed (and a row
    # with no key left gets output 0, as levyattn defines it).
    return mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))


def _weights_requested(kwargs: Mapping[str, Any]) -> bool:
    if kwargs.get("output_attentions"):
        return True
    # v5 models record attention weights with forward hooks on the attention modules, and some
    # (GPT-2) drop ``output_attentions`` before the layers, so the attention function is not told.
    # Weights are costly (the reference backend, (B, H, Lq, Lk) memory), so they are computed only
    # when recorded. transformers offers no public way to ask whether a pass records them (checked
    # up to 5.25), and the attention function never sees the model to hook it: this reads the
    # private collector that transformers' ``capture_outputs`` sets for the pass, where it exists.
    # If transformers renames it, test_the_private_output_collector_of_transformers_is_found in
    # tests/integrations/test_hf_attention.py fails rather than weights going silently missing.
    collector = _active_collector.get() if _active_collector is not None else None
    return isinstance(collector, dict) and ("attentions" in collector or "cross_attentions" in collector)


#: ``substitute(module, query, key, value, mask, is_causal, scaling) -> (attn_output, weights)``,
#: with FNA's own handling of the call already applied (kv heads repeated, HF masks converted, the
#: position bias folded into ``mask``, causality resolved).
AttentionSubstitute = Callable[
    [torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool, float | None],
    tuple[torch.Tensor, torch.Tensor | None],
]
_SUBSTITUTE: contextvars.ContextVar[AttentionSubstitute | None] = contextvars.ContextVar(
    "levyattn_fna_substitute", default=None
)


@contextlib.contextmanager
def substitute_attention(substitute: AttentionSubstitute) -> Iterator[None]:
    """Within the block, :func:`fna_attention_forward` hands each call to ``substitute`` instead of FNA.

    Calibration (``to_fna``) runs the model as softmax attention this way and records each layer's
    queries, keys and masks exactly as FNA will receive them. Context-local (threads and async
    tasks each see their own).
    """
    token = _SUBSTITUTE.set(substitute)
    try:
        yield
    finally:
        _SUBSTITUTE.reset(token)


def fna_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"fna"`` attention implementation, with transformers' attention-function signature.

    Args:
        module: the calling attention module; its ``config`` holds the ``fna_*`` keys, its
            ``layer_idx`` (or ``fna_layer_idx``) picks per-layer values, ``is_causal`` the default
            causality, ``training`` whether dropout applies.
        query: (B, H, Lq, d).  key: (B, Hkv, Lk, d) with H % Hkv == 0.  value: (B, Hkv, Lk, dv).
        attention_mask: None, bool (True = keep) or additive float, broadcastable to (B, H, Lq, Lk).
        scaling: ignored (FNA's distance scale is kappa and the bandwidth).
        dropout: attention-dropout probability on the weights, used when ``module.training``.
        is_causal: causality when ``attention_mask`` is None (default ``module.is_causal``).
        kwargs: ``output_attentions``; ``position_bias`` (added to log Phi); ``softcap`` and
            attention sinks (``s_aux``, ``sinks``) are rejected; everything else transformers passes along
            is ignored.

    Returns:
        (attn_output (B, Lq, H, dv), weights (B, H, Lq, Lk) or None). Weights only when asked.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='fna' does not support logit softcapping (softcap)")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            # An extra logit in each row's normalisation (GPT-OSS's s_aux, per head; sinks, per
            # token); left out, the weights would silently be those of another function.
            raise ValueError(f"attn_implementation='fna' does not support attention sinks ({name})")
    config = getattr(module, "config", None)
    if config is None:
        raise TypeError(f"{type(module).__name__} has no .config with the fna_* settings")
    heads, q_len = query.shape[1], query.shape[2]
    if key.shape[1] != heads:
        if heads % key.shape[1]:
            raise ValueError(f"query has {heads} heads, not a multiple of the key's {key.shape[1]} heads")
        key = repeat_kv(key, heads // key.shape[1])
        value = repeat_kv(value, heads // value.shape[1])
    mask = _prepare_mask(attention_mask, key.shape[2])
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' sdpa integration: causality by flag only without a mask and with more
    # than one query, and with more keys than queries the first q_len keys are kept. Its mask
    # functions (registered for "fna" too) leave the mask out in that case only when the cache is
    # empty (q_offset == 0 in masking_utils._ignore_causal_mask_sdpa): the extra keys are a static
    # cache's unwritten slots. Several new queries on a filled cache (chunked prefill, assisted
    # decoding) always get a mask, which aligns them bottom-right.
    causal = bool(causal) and mask is None and q_len > 1
    bias = kwargs.get("position_bias")
    if causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        bias = bias[..., :q_len] if bias is not None else None
    if bias is not None:
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = mask + bias

    substitute = _SUBSTITUTE.get()
    if substitute is not None:
        return substitute(module, query, key, value, mask, causal, scaling)

    settings = dict(_call_kwargs(module, config, heads, query.device))  # a copy: the cache stays whole
    if settings["density_a"] and causal_context(module, is_causal):
        raise ValueError(
            f"fna_density_a = {settings['density_a']} (layer {layer_index(module)} of {type(module).__name__}) "
            f"cannot be used in a decoder: {DENSITY_IN_DECODER}"
        )
    backend = settings.pop("backend")
    drop = float(dropout) if module.training else 0.0
    need_weights = _weights_requested(kwargs)
    if need_weights or drop > 0:
        out, weights = fractional_attention(
            query, key, value, **settings, attn_mask=mask, is_causal=causal, return_weights=True, backend="reference"
        )
        if drop > 0:
            weights = torch.nn.functional.dropout(weights, p=drop, training=True)
            out = weights @ value
    else:
        out = fractional_attention(query, key, value, **settings, attn_mask=mask, is_causal=causal, backend=backend)
        weights = None
    return out.transpose(1, 2).contiguous(), (weights if need_weights else None)


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register FNA as ``attn_implementation=name`` and return ``name`` (idempotent; done on import with "fna").

    The mask registration reuses transformers' ``sdpa_mask`` (boolean, True = keep), so
    causal, padding and sliding-window masks reach :func:`fna_attention_forward`; without it
    transformers would build no mask at all for an unknown implementation.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    AttentionInterface.register(name, fna_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()
