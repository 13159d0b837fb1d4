"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint in a run folder ``DIR`` is two files:

- ``DIR/ckpt-<step>.safetensors``: every tensor, with prefixed names —
  ``model.<name>`` (the model's ``state_dict``), ``optim.<param index>.<name>``
  (optimiser state such as AdamW's ``exp_avg``/``exp_avg_sq``/``step``) and
  ``rng.torch_cpu`` / ``rng.torch_cuda.<i>`` (torch generator states, uint8).
- ``DIR/checkpoint.json``: ``format``, ``model_type``, ``model_config``, the
  optimiser's ``param_groups``, the scheduler state, Python and NumPy RNG states,
  the position (``epoch``, ``step_in_epoch``, ``global_step``, the sampler seed),
  the metric history, free-form ``extra`` data, and the tensors file's name and
  SHA-256.

Both files are written atomically (temporary file, fsync, rename, fsync of the folder),
tensors first; ``checkpoint.json`` is the commit point. A run killed at any moment leaves
the previous complete checkpoint (or none), never a half-written one, and the SHA-256
catches a tensors file that does not belong to its JSON. What a killed save can leave
behind (a temporary file, a tensors file no JSON names) is removed by the next save and by
:func:`remove_stale_files`. Loading uses ``safetensors`` and ``json`` only, so a checkpoint
cannot execute code, and checks every field before anything uses it: a checkpoint that is
incomplete, inconsistent or holds non-finite numbers raises :class:`CheckpointError` naming
the file and the field.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levyattn.io import atomic_write_bytes, atomic_write_json, fsync_dir, read_json, remove_stale_temporaries

FORMAT = "levyattn-checkpoint-1"
JSON_NAME = "checkpoint.json"
TENSORS_GLOB = "ckpt-*.safetensors"
_TENSORS_NAME = re.compile(r"ckpt-\d{8,}\.safetensors")
# The trainer's position in a checkpoint: every field, and the type it must have.
POSITION_FIELDS = {"epoch": int, "step_in_epoch": int, "global_step": int, "samples": int, "seed": int,
                   "loss_sum": float, "weight_sum": float, "train_time_s": float}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit what it is loaded into."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors by name and the JSON state."""

    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.state["model_type"]

    @property
    def model_config(self) -> dict[str, Any]:
        return self.state["model_config"]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k[len("model.") :]: v for k, v in self.tensors.items() if k.startswith("model.")}
        for alias, name in self.state.get("model_aliases", {}).items():
            if name not in sd:
                raise CheckpointError(f"checkpoint {self.path}: tied weight {alias!r} names a missing tensor {name!r}")
            sd[alias] = sd[name]
        return sd


# ----------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a training step may draw from: (tensors, JSON-able states)."""
    tensors = {"rng.torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.torch_cuda.{i}"] = s.clone()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    json_state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, json_state


def set_rng_state(tensors: dict[str, torch.Tensor], json_state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("rng.torch_cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda])
    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- optimiser


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON (param_groups, scalar state)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    # The names of the tensors, so that loading can tell a complete state from one missing some
    # (torch loads a partial state and fails only at the next step).
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "tensors": sorted(tensors)}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], json_state: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, scalars in json_state.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": json_state["param_groups"]})


# ----------------------------------------------------------------------------- save / load


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    model_type: str,
    model_config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    position: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    keep_rng: bool = True,
) -> Path:
    """Write a checkpoint into ``directory`` atomically; return the JSON file's path.

    ``model`` may be wrapped in DistributedDataParallel; its ``module`` is saved.
    """
    from safetensors.torch import save as st_save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    # Tied weights (an LM's embedding and output layer) share storage, which safetensors
    # refuses; store each storage once and record the other names as aliases.
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()),
               v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()
    state: dict[str, Any] = {
        "format": FORMAT,
        "model_type": model_type,
        "model_config": model_config,
        "model_aliases": aliases,
        "position": position or {},
        "history": history or [],
        "extra": extra or {},
    }
    if optimizer is not None:
        otensors, ojson = optimizer_to_flat(optimizer)
        tensors.update(otensors)
        state["optimizer"] = ojson
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if keep_rng:
        rtensors, rjson = rng_state()
        tensors.update(rtensors)
        state["rng"] = rjson
    data = st_save(tensors, metadata={"format": FORMAT})
    step = int((position or {}).get("global_step", 0))
    tensors_name = f"ckpt-{step:08d}.safetensors"
    atomic_write_bytes(directory / tensors_name, data)
    state["tensors_file"] = tensors_name
    state["tensors_sha256"] = _sha256(data)
    json_path = atomic_write_json(directory / JSON_NAME, state)
    # Only now, with the new checkpoint committed, drop the old tensors file (and any a killed
    # save left behind).
    remove_stale_files(directory)
    return json_path


def remove_stale_files(directory: str | os.PathLike) -> list[str]:
    """Delete what killed saves leave in a run folder: temporary files, and tensors files that
    ``checkpoint.json`` does not name. Return their names.

    Nothing is deleted while ``checkpoint.json`` is missing or unreadable, or does not name a
    tensors file that exists: then the tensors files may be all that is left of the run.
    """
    directory = Path(directory)
    try:
        current = read_json(directory / JSON_NAME, "checkpoint").get("tensors_file")
    except (FileNotFoundError, ValueError, AttributeError):
        return []
    if not (isinstance(current, str) and _TENSORS_NAME.fullmatch(current) and (directory / current).is_file()):
        return []
    stale = [p for p in sorted(directory.glob(TENSORS_GLOB)) if p.name != current]
    for p in stale:
        p.unlink()
    if stale:
        fsync_dir(directory)
    return [p.name for p in stale] + remove_stale_temporaries(directory)


def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / JSON_NAME).is_file()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder (or its ``checkpoint.json``) without unpickling anything.

    Raises FileNotFoundError or :class:`CheckpointError` naming the file and the problem.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    json_path = path if path.suffix == ".json" else path / JSON_NAME
    if not json_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {json_path} does not exist")
    try:
        state = read_json(json_path, "checkpoint")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"checkpoint {json_path} has format {fmt!r}, expected {FORMAT!r}")
    _check_entries(json_path, state)
    tensors_path = json_path.parent / state["tensors_file"]
    if not tensors_path.is_file():
        raise FileNotFoundError(f"checkpoint tensors file not found: {tensors_path} (named by {json_path})")
    data = tensors_path.read_bytes()
    if _sha256(data) != state["tensors_sha256"]:
        raise CheckpointError(
            f"checkpoint tensors file {tensors_path} is corrupt: its SHA-256 does not match {json_path}"
        )
    try:
        tensors = st_load(data)
    except (SafetensorError, Exception) as err:  # safetensors raises several error types
        raise CheckpointError(f"checkpoint tensors file {tensors_path} cannot be read: {err}") from err
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint tensors file {tensors_path}: tensor {name!r} holds NaN or Inf values")
    return Checkpoint(path=json_path.parent, tensors=tensors, state=state)


# The entries of checkpoint.json and their JSON types: the first four are in every checkpoint,
# the others where the writer had them (a training checkpoint has them all).
_ENTRIES = {"model_type": str, "model_config": dict, "tensors_file": str, "tensors_sha256": str,
            "model_aliases": dict, "position": dict, "history": list, "extra": dict, "optimizer": dict, "rng": dict}
_REQUIRED_ENTRIES = ("model_type", "model_config", "tensors_file", "tensors_sha256")
TRAINING_ENTRIES = ("position", "history", "optimizer", "rng")


def _check_entries(json_path: Path, state: dict[str, Any]) -> None:
    for key in _REQUIRED_ENTRIES:
        if key not in state:
            raise CheckpointError(f"checkpoint {json_path} is missing the entry {key!r}")
    for key, kind in _ENTRIES.items():
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(
                f"checkpoint {json_path}: entry {key!r} must be a JSON {kind.__name__}, got {state[key]!r:.80}"
            )
    # A plain file name in the run folder: a path elsewhere would read (and later delete) another file.
    if not _TENSORS_NAME.fullmatch(state["tensors_file"]):
        raise CheckpointError(
            f"checkpoint {json_path}: tensors_file must be a name like ckpt-00000012.safetensors, "
            f"got {state['tensors_file']!r}"
        )
    if not all(isinstance(r, dict) for r in state.get("history", [])):
        raise CheckpointError(f"checkpoint {json_path}: every entry of 'history' must be a JSON object")


def check_training_state(ckpt: Checkpoint) -> dict[str, Any]:
    """Check everything a resumed training needs beyond the weights; return the position.

    The position must have every field of :data:`POSITION_FIELDS` with its type, finite and
    not negative (``seed`` and ``loss_sum`` aside: a task's loss may be negative); the
    optimiser state and the RNG states must be there and loadable. Raises
    :class:`CheckpointError` naming the checkpoint and the field.
    How the position fits the run (steps per epoch, epochs) is the trainer's to check.
    """
    where = f"checkpoint {ckpt.path / JSON_NAME}"
    for key in TRAINING_ENTRIES:
        if key not in ckpt.state:
            raise CheckpointError(f"{where} is missing the entry {key!r} (a training checkpoint needs it)")
    position = ckpt.state["position"]
    for key, kind in POSITION_FIELDS.items():
        if key not in position:
            raise CheckpointError(f"{where} is missing the position field {key!r}")
        value = position[key]
        ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
        signed = key in ("seed", "loss_sum")
        if isinstance(value, bool) or not ok_type or not math.isfinite(value) or (not signed and value < 0):
            raise CheckpointError(f"{where}: position field {key!r} must be a finite {kind.__name__}"
                                  f"{'' if signed else ' >= 0'}, got {value!r}")
    if not isinstance(ckpt.state["optimizer"].get("param_groups"), list):
        raise CheckpointError(f"{where}: entry 'optimizer' lacks its 'param_groups' list")
    if "rng.torch_cpu" not in ckpt.tensors:
        raise CheckpointError(f"checkpoint tensors file of {where} lacks the tensor 'rng.torch_cpu'")
    # Try the RNG states on the real generators, then put the current ones back: a malformed
    # state fails here, named, rather than as a traceback in the middle of the resume.
    current = rng_state()
    try:
        set_rng_state(ckpt.tensors, ckpt.state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where}: entry 'rng' is not a valid RNG state: {type(err).__name__}: {err}") from err
    finally:
        set_rng_state(*current)
    return dict(position)


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load the checkpoint's optimiser state into ``optimizer`` (CheckpointError when it does not fit)."""
    where = f"checkpoint {ckpt.path / JSON_NAME}"
    missing = [n for n in ckpt.state["optimizer"].get("tensors", []) if n not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"{where}: the optimiser state lacks the tensors {missing} in its tensors file")
    try:
        optimizer_from_flat(optimizer, ckpt.tensors, ckpt.state["optimizer"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{where}: the optimiser state does not fit the optimiser: {type(err).__name__}: {err}"
        ) from err
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                    raise CheckpointError(
                        f"{where}: the optimiser state {name!r} has shape {tuple(value.shape)}, its parameter "
                        f"{tuple(p.shape)}"
                    )


def check_model_type(ckpt: Checkpoint, model_type: str) -> None:
    if ckpt.model_type != model_type:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds a {ckpt.model_type!r} model, cannot load it into a {model_type!r} model"
        )


def load_model_state(model: torch.nn.Module, ckpt: Checkpoint, model_type: str | None = None) -> None:
    """Load the checkpoint's weights into ``model`` (strict), after checking the model type."""
    model = getattr(model, "module", model)
    expected = model_type or getattr(model, "model_type", None)
    if expected is not None:
        check_model_type(ckpt, expected)
    try:
        model.load_state_dict(ckpt.model_state_dict(), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model: {err}") from err


def load_model(path: str | os.PathLike, model_type: str | None = None, map_location: str = "cpu") -> torch.nn.Module:
    """Rebuild the model a checkpoint holds (``levyattn.models.build_model``) and load its weights.

    ``model_type``, if given, must match the checkpoint's (CheckpointError otherwise).
    """
    return model_from_checkpoint(load_checkpoint(path), model_type).to(map_location)


def model_from_checkpoint(ckpt: Checkpoint, model_type: str | None = None) -> torch.nn.Module:
    """The model a loaded checkpoint holds, rebuilt and with its weights; ``model_type``,
    if given, must match the checkpoint's (CheckpointError otherwise)."""
    from levyattn.models import build_model

    if model_type is not None:
        check_model_type(ckpt, model_type)
    model = build_model(ckpt.model_type, ckpt.model_config)
    load_model_state(model, ckpt, ckpt.model_type)
    return model


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "check_model_type",
    "check_training_state",
    "has_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_model_state",
    "load_optimizer_state",
    "model_from_checkpoint",
    "remove_stale_files",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
