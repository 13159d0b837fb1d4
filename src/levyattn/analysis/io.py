"""Loading saved attention tensors: .npy, .npz, .pt/.pth and .safetensors.

Every loader returns ``{name: float64 numpy array}``. A single tensor is named ``attention``;
a dict of tensors keeps its keys (e.g. ``layer0``, ``layer1``); a list/tuple of tensors (a
Hugging Face model's ``outputs.attentions`` saved with ``torch.save``) becomes ``layer0``,
``layer1``, ... ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and
plain containers only, never arbitrary pickled code. ``.npy``/``.npz`` with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from levyattn.io import read_tensor_file


def _from_torch_object(obj: object, path: Path, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    import torch

    def tensor(name: str, t: object) -> np.ndarray:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        return t.detach().to("cpu", torch.float64).numpy()

    if isinstance(obj, torch.Tensor):
        return {"attention": tensor("attention", obj)}
    if isinstance(obj, dict):
        return {str(k): tensor(str(k), v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return {f"layer{i}": tensor(f"layer{i}", v) for i, v in enumerate(obj) if v is not None}
    raise ValueError(f"{path} holds a {type(obj).__name__}; expected a tensor, a dict of tensors or a list of tensors")


def load_attention(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """Load attention tensors from ``path`` as float64 arrays; ``key`` keeps only that entry."""
    return load_attention_with_dtypes(path, key)[0]


def load_attention_with_dtypes(
    path: str | os.PathLike, key: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """As :func:`load_attention`, plus each entry's stored dtype (e.g. "bfloat16"), which
    decides the default row-sum tolerance."""
    path = Path(path)
    dtypes: dict[str, str] = {}
    tensors = _from_torch_object(read_tensor_file(path, "attention file"), path, dtypes)
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{path} has no entry {key!r}; it has {sorted(tensors)}")
        tensors = {key: tensors[key]}
    return tensors, {k: dtypes[k] for k in tensors}
