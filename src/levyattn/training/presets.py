"""Every preset by name, and ``--set key=value`` overrides.

Presets come from the task modules (``PRESETS`` in ``tasks/classification.py`` and,
when present, ``tasks/translation.py`` and ``tasks/lm.py``); the format is described in
:mod:`levyattn.training.tasks`.

Overrides: ``key=value`` where ``key`` is a dotted path into the preset
(``train.lr=3e-4``, ``model.alpha=1.4``, ``data.task_args.length=128``) or a bare key
that exists in exactly one of model, data, train (``data_dir=/data/aclImdb``, ``epochs=3``,
``alpha=1.6``); ``seed`` means ``train.seed``. A bare key the preset does not list goes to
``train`` when it is a training setting, to ``data`` when it is among the ``DATA_KEYS`` of the
preset's task module, and to ``model`` otherwise. Values are parsed as JSON when they can
be (``3``, ``1e-3``, ``true``, ``null``, ``[1, 2]``) and kept as strings otherwise.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Iterable
from typing import Any

from levyattn.config import did_you_mean
from levyattn.training.tasks import PRESET_SECTIONS, check_preset

TASK_MODULES = ("classification", "translation", "lm")
ALIASES = {"seed": "train.seed"}
# Data settings a resumed run may change: where the same data lies (a copy moved elsewhere).
RESUME_NEUTRAL_DATA = ("data_dir", "train_file", "eval_file")


def all_presets() -> dict[str, dict[str, Any]]:
    """name -> preset, merged over the task modules that exist."""
    merged: dict[str, dict[str, Any]] = {}
    for name in TASK_MODULES:
        try:
            module = importlib.import_module(f"levyattn.training.tasks.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"levyattn.training.tasks.{name}":
                raise
            continue
        for key, preset in getattr(module, "PRESETS", {}).items():
            if key in merged:
                raise ValueError(f"preset {key!r} is defined twice (tasks.{name} and {merged[key]['task']})")
            merged[key] = preset
    return merged


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of the preset ``name`` (ValueError listing the valid names)."""
    presets = all_presets()
    if name not in presets:
        raise ValueError(
            f"unknown preset {name!r}{did_you_mean(name, presets)} (valid presets: {', '.join(sorted(presets))})"
        )
    return check_preset(copy.deepcopy(presets[name]), f"preset {name!r}")


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _resolve(preset: dict[str, Any], key: str) -> list[str]:
    if key in ALIASES:
        return ALIASES[key].split(".")
    if "." in key:
        return key.split(".")
    if key in preset and key not in PRESET_SECTIONS:
        return [key]
    hits = [s for s in ("model", "data", "train") if isinstance(preset.get(s), dict) and key in preset[s]]
    if len(hits) == 1:
        return [hits[0], key]
    if len(hits) > 1:
        raise ValueError(f"--set {key}: the key is in several sections {hits}; write it as e.g. {hits[0]}.{key}")
    # A key the preset does not list yet (an option left at its default): training settings
    # go to "train", the data settings of the preset's task (its DATA_KEYS) to "data", the rest
    # to "model".
    from dataclasses import fields

    from levyattn.training.tasks import task_module
    from levyattn.training.trainer import TrainConfig

    if key in {f.name for f in fields(TrainConfig)}:
        return ["train", key]
    if key in task_module(preset["task"]).DATA_KEYS:
        return ["data", key]
    return ["model", key]


def apply_overrides(preset: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``preset`` with every ``key=value`` applied."""
    out = copy.deepcopy(preset)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"--set needs key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set needs key=value, got {item!r}")
        path = _resolve(out, key)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ValueError(f"--set {key}: {part!r} is not a section")
            node = node.setdefault(part, {})
        node[path[-1]] = parse_value(text)
    return check_preset(out)


def split_overrides(values: Iterable[str] | None) -> list[str]:
    """Flatten ``--set a=1 --set b=2`` and ``--set a=1 b=2`` forms."""
    out: list[str] = []
    for v in values or []:
        out.extend(v if isinstance(v, list) else [v])
    return out


__all__ = [
    "RESUME_NEUTRAL_DATA", "TASK_MODULES", "all_presets", "apply_overrides", "check_requirements",
    "check_resume_preset", "get_preset", "parse_value", "preset_from_run", "resume_changes", "run_changes",
    "split_overrides",
    "train_preset",
]


def train_preset(
    preset: dict[str, Any],
    out_dir: Any = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    dist_info: Any = None,
    on_epoch_end: Any = None,
) -> tuple[dict[str, Any], Any]:
    """Build the preset's task and train it; return (the trainer's result, the trainer).

    ``resume`` and ``overwrite`` are the :class:`~levyattn.training.trainer.Trainer`'s. The
    preset is stored in every checkpoint, so ``levyattn train --resume DIR`` can rebuild the
    same task. The optional dependencies it needs are checked first
    (:class:`~levyattn._extras.MissingExtraError` before anything is written); a resumed run's
    preset must have the checkpoint's task, model and data settings (:func:`resume_changes`).
    """
    from levyattn.training.tasks import make_task
    from levyattn.training.trainer import TrainConfig, Trainer

    check_requirements(preset)
    if resume and out_dir is not None:
        check_resume_preset(out_dir, preset)
    task = make_task(preset)
    config = TrainConfig.from_dict(preset["train"])
    trainer = Trainer(task, config, out_dir, resume=resume, overwrite=overwrite, progress=progress,
                      extra={"preset": preset},
                      dist_info=dist_info, on_epoch_end=on_epoch_end)
    return trainer.fit(), trainer


def resume_changes(saved: dict[str, Any], preset: dict[str, Any]) -> list[str]:
    """What ``preset`` changes from the ``saved`` preset of a run that a resumed run may not
    change: its task, model type, model settings, and data settings other than
    :data:`RESUME_NEUTRAL_DATA`, as ``"data.key: saved -> now"``. (The training settings are the
    trainer's to check: :func:`levyattn.training.trainer.resume_changes`.)"""
    from levyattn.training.trainer import changed_settings

    return (changed_settings({k: saved.get(k) for k in ("task", "model_type")},
                             {k: preset.get(k) for k in ("task", "model_type")})
            + changed_settings(saved.get("model", {}), preset.get("model", {}), prefix="model.")
            + changed_settings(saved.get("data", {}), preset.get("data", {}), RESUME_NEUTRAL_DATA, prefix="data."))


def run_changes(saved: dict[str, Any], preset: dict[str, Any]) -> list[str]:
    """Every setting ``preset`` changes from the ``saved`` preset of a run that a resumed run may not
    change: :func:`resume_changes` and the training settings
    (:func:`levyattn.training.trainer.resume_changes`, as ``"name: saved -> now"``)."""
    from levyattn.training.trainer import TrainConfig, changed_settings
    from levyattn.training.trainer import resume_changes as train_changes

    saved_train, train = saved.get("train", {}), preset.get("train", {})
    try:
        changes = train_changes(TrainConfig.from_dict(saved_train), TrainConfig.from_dict(train))
    except (TypeError, ValueError):  # saved settings this version does not accept: every difference counts
        changes = changed_settings(saved_train, train)
    return resume_changes(saved, preset) + changes


def check_resume_preset(run_dir: Any, preset: dict[str, Any]) -> None:
    """CheckpointError naming the settings unless the run in ``run_dir`` may resume with
    ``preset`` (:func:`resume_changes`). Nothing to check when the folder holds no readable
    checkpoint recording a preset: the trainer reads the checkpoint itself and names what is wrong."""
    from pathlib import Path

    from levyattn.training.checkpoint import JSON_NAME, CheckpointError

    if not (Path(run_dir) / JSON_NAME).is_file():
        return
    try:
        saved = preset_from_run(run_dir)
    except ValueError:  # unreadable, or no preset recorded: the trainer's checks name what is wrong
        return
    changes = resume_changes(saved, preset)
    if changes:
        raise CheckpointError(
            f"checkpoint {Path(run_dir) / JSON_NAME} was trained with other settings than this run: "
            f"{'; '.join(changes)}. A resumed run may change only where its data lies "
            f"({', '.join(RESUME_NEUTRAL_DATA)}) and some training settings; train the new settings as a new run "
            "(another folder, or overwrite)"
        )


def check_requirements(preset: dict[str, Any]) -> None:
    """:class:`~levyattn._extras.MissingExtraError` naming the extra to install unless every
    optional dependency that training ``preset`` imports is installed."""
    from levyattn._extras import require_all
    from levyattn.training.tasks import preset_requirements

    require_all(preset_requirements(preset), purpose=f"training a {preset['task']} preset")


def preset_from_run(run_dir: Any) -> dict[str, Any]:
    """The preset a run folder was trained with (from its checkpoint, else its config.json)."""
    from pathlib import Path

    from levyattn.io import read_json

    run_dir = Path(run_dir)
    ck = run_dir / "checkpoint.json"
    source = ck if ck.is_file() else run_dir / "config.json"
    if not source.is_file():
        raise FileNotFoundError(f"{run_dir} holds no run: neither {ck} nor {source} exists")
    state = read_json(source, "run state")
    preset = state.get("extra", state).get("preset") if isinstance(state, dict) else None
    if preset is None:
        raise ValueError(f"{source} does not record the preset it was trained with")
    return check_preset(preset, f"the preset in {source}")
