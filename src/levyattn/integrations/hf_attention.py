"""The attention implementation ``attn_implementation="fna"`` of Hugging Face ``transformers``.

The attention function transformers calls, its ``fna_*`` config keys and their validation, and
its registration. ``levyattn.integrations.huggingface`` re-exports the public names (with
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
import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from levyattn._extras import MissingExtraError
from levyattn.config import FNAConfig, check_choice
from levyattn.functional import BACKENDS, fractional_attention

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

# Config key -> default: FNAConfig's kernel settings (its exclude_self has no key: causal and
# padding masks come from the model) and fractional_attention's backend.
CONFIG_KEYS: dict[str, Any] = {
    **{f"fna_{f.name}": f.default for f in dataclasses.fields(FNAConfig) if f.name != "exclude_self"},
    "fna_backend": inspect.signature(fractional_attention).parameters["backend"].default,
}
_PER_HEAD = ("fna_alpha", "fna_bandwidth")
_MODEL_WIDE = ("fna_backend",)
_CACHE_ATTR = "_levyattn_fna_cache"
_LAYER_ATTR = "fna_layer_idx"
#: On a config that the stacks of a model copy when it loads (a T5's top config): each stack's
#: ``fna_*`` values, ``{"encoder": {...}, "decoder": {...}}``, picked by the copy's ``is_decoder``
#: (saved with ``SAVED_TOP`` too); on a converted model it follows the stacks' configs (``_StackValues``).
STACKS_KEY = "fna_stacks"
#: The entry of a saved ``STACKS_KEY`` with the top config's own ``fna_*`` values as saved.
SAVED_TOP = "top"


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


def layer_index(module: torch.nn.Module) -> int | None:
    """The layer index an attention module's per-layer ``fna_*`` values are read at (None: none)."""
    idx = getattr(module, _LAYER_ATTR, None)
    if idx is None:
        idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) else None


class _StackConfig:
    """A config read with its stack's ``fna_*`` values (from ``STACKS_KEY``) in place of its own."""

    def __init__(self, config: Any, values: dict[str, Any]) -> None:
        self._config, self._values = config, values

    def __getattr__(self, name: str) -> Any:
        return self._values[name] if name in self._values else getattr(self._config, name)


def _edited_keys(config: Any) -> list[str]:
    """The ``fna_*`` keys set on a copy of a saved top config since it loaded: those that differ
    from the saved top config's (``SAVED_TOP``; none in a save that lacks it)."""
    saved = getattr(config, STACKS_KEY, None)
    saved = saved.get(SAVED_TOP) if isinstance(saved, Mapping) else None
    if not isinstance(saved, dict):
        return []
    return [key for key in CONFIG_KEYS if repr(getattr(config, key, None)) != repr(saved.get(key))]


def _stack_entry(config: Any, edited_ok: bool = False) -> dict[str, Any] | None:
    """The ``fna_*`` values ``config`` reads from its ``STACKS_KEY`` (a stack's copy of a saved T5's
    top config): the entry "decoder" where ``config.is_decoder``, else "encoder"; None without one.
    A key set on the copy since it loaded is refused (it would be ignored) unless ``edited_ok``."""
    stacks = getattr(config, STACKS_KEY, None)
    if not stacks:
        return None
    role = "decoder" if getattr(config, "is_decoder", False) else "encoder"
    if not isinstance(stacks, Mapping) or not isinstance(stacks.get(role), dict):
        raise ValueError(f"config.{STACKS_KEY} must map 'encoder' and 'decoder' to their fna_* settings, "
                         f"got {stacks!r}")
    unknown = set(stacks[role]) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"config.{STACKS_KEY}[{role!r}] holds unknown keys {sorted(unknown)}; valid: {list(CONFIG_KEYS)}"
        )
    edited = [] if edited_ok else _edited_keys(config)
    if edited:
        key = edited[0]
        raise ValueError(
            f"config.{key} = {getattr(config, key, None)!r} was set on the {role}'s copy of a saved T5-style "
            f"model's config, which reads its values from {STACKS_KEY}[{role!r}] (and is not the config "
            "save_pretrained writes): call configure_fna(model) once after loading (the value set is kept)"
        )
    return stacks[role]


def _own_stack(config: Any) -> Any:
    """``config``, or where it carries ``STACKS_KEY`` the view with the values of its stack
    (:func:`_stack_entry`), which take precedence over its own ``fna_*`` keys."""
    values = _stack_entry(config)
    return config if values is None else _StackConfig(config, values)


class _StackValues(Mapping):
    """``{"encoder": {...}, "decoder": {...}}``: each stack config's ``fna_*`` values, read when asked.

    The value of ``STACKS_KEY`` on a top config the stacks copy (a T5's). transformers
    serialises a config from a deep copy of its attributes, and a deep copy of this is the plain
    dict of the values at that moment, so ``save_pretrained`` writes the stacks' values as they are
    then, including those set after ``to_fna`` (``configure_fna`` on ``model.decoder.config``);
    a deep copy of the model follows the copies of the stacks' configs. The plain dict also holds
    ``SAVED_TOP``: the top config's own ``fna_*`` values, which each stack's copy holds as its own
    keys when the model loads, so that one changed there afterwards is told apart (:func:`_stack_entry`).
    """

    def __init__(self, configs: Mapping[str, Any], top: Any) -> None:
        self._configs, self._top = dict(configs), top

    def __getitem__(self, role: str) -> dict[str, Any]:
        config = self._configs[role]
        return {k: getattr(config, k) for k in CONFIG_KEYS if hasattr(config, k)}

    def __iter__(self) -> Iterator[str]:
        return iter(self._configs)

    def configs(self) -> list[Any]:
        """The stacks' configs, in the order of the roles."""
        return list(self._configs.values())

    def __len__(self) -> int:
        return len(self._configs)

    def __deepcopy__(self, memo: dict) -> Mapping[str, Any]:
        # In a deep copy of the whole model (a module's config comes after its submodules) the stacks'
        # configs are copied already: the copy follows theirs. Otherwise (to_dict) it is plain data.
        copies = [memo.get(id(config)) for config in self._configs.values()]
        if all(c is not None for c in copies) and id(self._top) in memo:
            return _StackValues(dict(zip(self._configs, copies)), memo[id(self._top)])
        top = {k: getattr(self._top, k) for k in CONFIG_KEYS if hasattr(self._top, k)}
        return copy.deepcopy({**dict(self.items()), SAVED_TOP: top}, memo)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


def _unlinked(config: Any) -> bool:
    """Whether ``config`` carries ``STACKS_KEY`` as loaded (plain data no stack's config follows):
    a saved T5's top config, or a stack's copy of it."""
    stacks = getattr(config, STACKS_KEY, None)
    return bool(stacks) and not isinstance(stacks, _StackValues)


def stack_values(model: torch.nn.Module, configs: list[Any]) -> _StackValues:
    """The ``STACKS_KEY`` value of a top config whose stacks read ``configs`` (copies of it, one
    encoder and one decoder), following their ``fna_*`` keys."""
    roles = {"decoder" if getattr(c, "is_decoder", False) else "encoder": c for c in configs}
    if len(roles) != len(configs) or len(configs) != 2:
        raise ValueError(f"{type(model).__name__}'s {len(configs)} attention configs are not one encoder and one "
                         "decoder: their settings cannot be saved in its top config")
    return _StackValues(roles, model.config)


def link_stacks(model: torch.nn.Module) -> None:
    """Link a model loaded from a save whose top config carries ``STACKS_KEY`` (a converted T5) as
    ``to_fna`` leaves a converted one: each stack's config, a copy of the top config made when the
    model loaded, takes its entry as its own ``fna_*`` keys and drops ``STACKS_KEY``, and the top
    config's ``STACKS_KEY`` follows the stacks' configs, so that an edit of a stack's config takes
    effect and ``save_pretrained`` writes it; a key set on a stack's copy since loading is kept.
    A T5 never converted gets the same ``STACKS_KEY``. Does nothing to other models, or a second time."""
    top = getattr(model, "config", None)
    configs = list({id(m.config): m.config for m in attention_modules(model)}.values())
    if top is None or not configs or any(c is top for c in configs):
        return  # no stack reads a copy of the top config
    loaded = [c for c in configs if _unlinked(c)]
    if not loaded and not _unlinked(top):
        # Linked already, sub-configs saved inside the top config (a Llava's), or not one encoder and
        # one decoder; else a T5 never converted, whose stacks' copies would not see the top's keys either.
        held = any(c is v for c in configs for v in vars(top).values())
        roles = {bool(getattr(c, "is_decoder", False)) for c in configs}
        if isinstance(getattr(top, STACKS_KEY, None), _StackValues) or held or len(configs) != 2 or len(roles) != 2:
            return
    linked = stack_values(model, configs)  # may refuse: checked before anything changes
    # A key set on a stack's copy since it loaded is kept: it is what its stack was given last.
    entries = [(c, _stack_entry(c, edited_ok=True), _edited_keys(c)) for c in loaded]
    for config, values, edited in entries:
        delattr(config, STACKS_KEY)
        for key, value in values.items():
            if key not in edited:
                setattr(config, key, value)
    setattr(top, STACKS_KEY, linked)


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
