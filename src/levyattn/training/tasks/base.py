"""What every task does with its preset before anything task-specific (see :mod:`levyattn.training.tasks`)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class PresetTask:
    """Keeps a private copy of the preset and checks its model type and dataset.

    Subclasses set ``name``, ``dataset_names`` (the valid ``data.dataset`` values), ``data_keys``
    (every ``data`` setting the task reads: its module's ``DATA_KEYS``; a preset with another is
    refused, so that a misspelt setting cannot be silently ignored), when only some model types fit
    ``model_types``, and in ``count_keys`` the ``data.<key>`` values that must be integers >= 1
    where the preset sets them. After ``__init__``: ``preset``, ``model_type``, ``data_cfg``
    (a copy of ``preset["data"]``), ``dataset`` and ``_model_cfg`` (a copy of ``preset["model"]``).
    Subclasses give ``model_config`` (``_model_cfg`` completed by the data), which ``build_model`` builds.
    """

    name: str
    dataset_names: tuple[str, ...] = ()
    data_keys: tuple[str, ...] = ("dataset",)
    model_types: tuple[str, ...] | None = None  # None: any model type
    count_keys: tuple[str, ...] = ()

    def __init__(self, preset: dict[str, Any]) -> None:
        self.preset = copy.deepcopy(preset)
        self.model_type: str = preset["model_type"]
        if self.model_types is not None and self.model_type not in self.model_types:
            wanted = " or ".join(repr(t) for t in self.model_types)
            raise ValueError(f"the {self.name} task needs model_type {wanted}, got {self.model_type!r}")
        self.data_cfg: dict[str, Any] = dict(preset["data"])
        unknown = sorted(set(self.data_cfg) - set(self.data_keys))
        if unknown:
            raise ValueError(f"unknown data settings {unknown} for the {self.name} task; valid: {list(self.data_keys)}")
        self.dataset = self.data_cfg.get("dataset")
        if self.dataset not in self.dataset_names:
            raise ValueError(f"data.dataset must be one of {self.dataset_names}, got {self.dataset!r}")
        self._model_cfg: dict[str, Any] = dict(preset["model"])
        for key in self.count_keys:
            value = self.data_cfg.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key} must be an integer >= 1, got {value!r}")

    def build_model(self) -> nn.Module:
        from levyattn.models import build_model

        return build_model(self.model_type, self.model_config)
