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

Both files are written atomically (temporary file, then rename), tensors first;
``checkpoint.json`` is the commit point. A run killed at any moment leaves the
previous complete checkpoint (or none), never a half-written one, and the SHA-256
catches a tensors file that does not belong to its JSON. Loading uses
``safetensors`` and ``json`` only, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levyattn.io import atomic_write_bytes, atomic_write_json, read_json

FORMAT = "levyattn-checkpoint-1"
JSON_NAME = "checkpoint.json"


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
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


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
    previous = _previous_tensors_file(directory)
    json_path = atomic_write_json(directory / JSON_NAME, state)
    # Only now, with the new checkpoint committed, drop the old tensors file.
    if previous and previous != tensors_name and (directory / previous).exists():
        (directory / previous).unlink()
    return json_path


def _previous_tensors_file(directory: Path) -> str | None:
    try:
        return read_json(directory / JSON_NAME, "checkpoint").get("tensors_file")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


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
    for key in ("model_type", "model_config", "tensors_file", "tensors_sha256"):
        if key not in state:
            raise CheckpointError(f"checkpoint {json_path} is missing the entry {key!r}")
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
    return Checkpoint(path=json_path.parent, tensors=tensors, state=state)


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
    "has_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_model_state",
    "model_from_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
