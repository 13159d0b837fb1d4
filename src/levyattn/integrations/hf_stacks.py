"""The ``fna_*`` values of a T5-style model's stacks, kept through ``save_pretrained``.

The problem: a T5 saves only its top config, and when it loads each stack (encoder, decoder) gets
a copy of it. A stack's values set on its own config would be lost on save, and the same values
saved as the top config's keys would reach both stacks alike.

The rule:

- The top config carries :data:`STACKS_KEY` (``fna_stacks``): ``{"encoder": {...}, "decoder":
  {...}}``, each stack's ``fna_*`` values, picked by a copy's ``is_decoder``. Saved, it also holds
  :data:`SAVED_TOP` (``"top"``): the top config's own ``fna_*`` values as saved, which each copy
  holds as its own keys when the model loads, so a key changed on a copy since is told apart.
- On a converted (or linked) model the top config's ``STACKS_KEY`` is a :class:`_StackValues` that
  follows the stacks' configs, so an edit of ``model.decoder.config`` is what ``save_pretrained``
  writes (:func:`stack_values`).
- A model loaded from such a save reads each stack's entry (:func:`_own_stack`) until
  :func:`link_stacks` (``configure_fna(model)`` and ``to_fna`` call it) makes each entry its stack
  config's own keys, keeping a key set on a copy since loading.
- Until then an edit is refused: a key set on a stack's copy (it would be ignored:
  :func:`_stack_entry`), and ``configure_fna`` on a config carrying ``STACKS_KEY`` as loaded
  (it would be ignored or lost on save).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from levyattn.integrations.hf_settings import CONFIG_KEYS, attention_modules

__all__ = ["SAVED_TOP", "STACKS_KEY", "link_stacks", "stack_values"]

#: On a config that the stacks of a model copy when it loads (a T5's top config): each stack's
#: ``fna_*`` values, ``{"encoder": {...}, "decoder": {...}}``, picked by the copy's ``is_decoder``
#: (saved with ``SAVED_TOP`` too); on a converted model it follows the stacks' configs (``_StackValues``).
STACKS_KEY = "fna_stacks"
#: The entry of a saved ``STACKS_KEY`` with the top config's own ``fna_*`` values as saved.
SAVED_TOP = "top"


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
