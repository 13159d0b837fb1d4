"""Tasks: what the trainer trains. One small protocol shared by every experiment.

The :class:`~levyattn.training.trainer.Trainer` knows nothing about images, text or
translation. It asks a **task** for a model, two datasets and a loss, and calls the
task's ``evaluate`` once per epoch. Classification lives in
``tasks/classification.py``; translation and language modelling plug in the same way
(``tasks/translation.py``, ``tasks/lm.py``). All three start from ``tasks/base.py``
(:class:`~levyattn.training.tasks.base.PresetTask`: the preset's copy and its checks).

The Task protocol
-----------------
A task is any object with these members (see :class:`Task`)::

    name: str                                   # e.g. "classification"
    model_type: str                             # a key of levyattn.models.MODEL_TYPES
    model_config: dict                          # what build_model(model_type, ...) takes
    build_model() -> nn.Module                  # a fresh, randomly initialised model
    datasets() -> (train_dataset, eval_dataset) # map-style datasets (len + __getitem__)
    collate(samples: list) -> batch             # turns a list of dataset items into a batch
    loss(model, batch) -> (loss, weight)        # mean loss over the batch (0-dim tensor)
                                                # and the number of units it averages over
                                                # (samples, or target tokens for seq2seq/LM)
    evaluate(model, loader) -> dict[str, float] # metrics on a loader of collated batches;
                                                # must contain task.metric (e.g. "accuracy")
    metric: str                                 # the headline metric
    higher_is_better: bool                      # its direction
    attention(model, batch) -> (weights, valid) # optional: per-layer (B, H, L, L) weights and
                                                # the valid tokens (B, L) bool or None, for
                                                # sweeps' spectral gaps and analyze --preset-data

``weight`` lets the trainer average exactly over a global batch split across
data-parallel processes: each process's mean loss is reweighted by its share of the
global weight before DistributedDataParallel averages the gradients, so two
processes compute the same update as one process on the whole batch.

``batch`` is whatever ``collate`` returns; the trainer moves tensors (also inside
tuples, lists and dicts) to the device and never looks inside otherwise.

The preset format
-----------------
A preset is a plain, JSON-serialisable dict; ``PRESETS`` in each task module maps
names to presets and :mod:`levyattn.training.presets` merges them all::

    {
      "task": "classification",            # module levyattn.training.tasks.<task>
      "description": "one line",
      "model_type": "text_classifier",     # key of levyattn.models.MODEL_TYPES
      "model": {...},                      # config dict for build_model(model_type, ...)
      "data": {"dataset": "digits", "data_dir": None, ...},   # task-specific
      "train": {...},                      # TrainConfig fields (epochs, batch_size, lr, ...)
      "sweep": {"alphas": [...], "attention": [...], "seeds": [...]},  # defaults for sweeps (also "restarts")
    }

Each task module provides ``PRESETS``, ``DATA_KEYS`` (every ``data`` setting the task reads:
``--set`` routes a bare key among them to ``data``, and the task refuses any other) and
``make_task(preset) -> Task``, and may provide
``requirements(preset) -> {extra: modules}``: the optional dependencies (extras of
``pyproject.toml``) that the preset needs with its settings (a SentencePiece tokenizer needs
``sentencepiece``, a byte tokenizer does not); :func:`preset_requirements` adds what every
training needs and :func:`levyattn.training.presets.train_preset` checks them all up front.
``--set key=value`` on the command line edits a preset before the task is built:
``key`` is a dotted path (``train.lr=3e-4``, ``model.alpha=1.4``) or a bare key found
in exactly one section (``data_dir=/data/aclImdb``, ``epochs=3``).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

PRESET_SECTIONS = ("model", "data", "train", "sweep")
PRESET_KEYS = ("task", "description", "model_type") + PRESET_SECTIONS


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from an experiment (see the module docstring)."""

    name: str
    model_type: str
    model_config: dict[str, Any]
    metric: str
    higher_is_better: bool

    def build_model(self) -> nn.Module: ...

    def datasets(self) -> tuple[Any, Any]: ...

    def collate(self, samples: list) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, float]: ...

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]: ...


TASK_METHODS = ("build_model", "datasets", "collate", "loss", "evaluate")
TASK_ATTRIBUTES = ("name", "model_type", "model_config", "metric", "higher_is_better")


def check_task(task: Any) -> Any:
    """TypeError unless ``task`` has the Task protocol's members.

    Checked on the class where possible: ``isinstance(task, Task)`` would evaluate
    properties such as ``model_config``, which may load a whole dataset.
    """
    cls = type(task)
    missing = [m for m in TASK_METHODS if not callable(getattr(cls, m, None))]
    missing += [a for a in TASK_ATTRIBUTES if not (hasattr(cls, a) or a in getattr(task, "__dict__", {}))]
    if missing:
        raise TypeError(f"task {cls.__name__} does not implement the Task protocol: missing {missing}")
    return task


def check_preset(preset: dict[str, Any], name: str = "preset") -> dict[str, Any]:
    """Check a preset's shape; return it. Raises ValueError naming what is wrong."""
    if not isinstance(preset, dict):
        raise TypeError(f"{name} must be a dict, got {type(preset).__name__}")
    for key in ("task", "model_type", "model", "data", "train"):
        if key not in preset:
            raise ValueError(f"{name} has no {key!r} entry (a preset needs {PRESET_KEYS})")
    unknown = set(preset) - set(PRESET_KEYS)
    if unknown:
        raise ValueError(f"{name} has unknown entries {sorted(unknown)}; valid: {PRESET_KEYS}")
    for section in PRESET_SECTIONS:
        if section in preset and not isinstance(preset[section], dict):
            raise ValueError(f"{name}[{section!r}] must be a dict, got {type(preset[section]).__name__}")
    return preset


def task_module(task_name: str):
    """The module ``levyattn.training.tasks.<task_name>`` (ValueError if there is none)."""
    if not isinstance(task_name, str) or not task_name.isidentifier():
        raise ValueError(f"task must be a module name such as 'classification', got {task_name!r}")
    try:
        return importlib.import_module(f"levyattn.training.tasks.{task_name}")
    except ModuleNotFoundError as err:
        if err.name != f"levyattn.training.tasks.{task_name}":
            raise
        raise ValueError(f"unknown task {task_name!r}: no module levyattn.training.tasks.{task_name}") from err


# What every training needs: safetensors writes the checkpoints.
TRAINING_REQUIREMENTS: dict[str, tuple[str, ...]] = {"train": ("safetensors",)}


def preset_requirements(preset: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """extra -> modules that training ``preset`` imports (its task module's ``requirements``
    and :data:`TRAINING_REQUIREMENTS`), for :func:`levyattn._extras.require_all`."""
    check_preset(preset)
    merged = dict(TRAINING_REQUIREMENTS)
    declared = getattr(task_module(preset["task"]), "requirements", None)
    for extra, modules in (declared(preset) if declared else {}).items():
        merged[extra] = tuple(dict.fromkeys(merged.get(extra, ()) + tuple(modules)))
    return merged


def make_task(preset: dict[str, Any]) -> Task:
    """Build the task a preset names (``preset["task"]``)."""
    check_preset(preset)
    module = task_module(preset["task"])
    return module.make_task(preset)


__all__ = [
    "PRESET_KEYS", "PRESET_SECTIONS", "TRAINING_REQUIREMENTS", "Task", "check_preset", "check_task", "make_task",
    "preset_requirements", "task_module",
]
