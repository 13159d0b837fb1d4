"""The computation paths the backend tests compare with ``reference``.

``tiled`` has two on the CPU: the tile loop (``LEVYATTN_COMPILE=0``, here in 3-row tiles) and
the fused C++ kernel (here in 3 x 4 tiles), so that small inputs cross tile boundaries. ``flex``
runs uncompiled (``flex_attention`` eagerly, with the same score and mask modifiers):
compiling a kernel for each shape would take minutes; ``TestFlexOnCPU`` in
``tests/test_functional.py`` runs the compiled kernel.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from unittest import mock

import levyattn.backends.fused_cpu as fused_cpu
import levyattn.backends.tiled as tiled
from levyattn.backends import flex

PATHS = ("tile loop", "fused kernel", "sdpa", "flex", "auto")


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@contextlib.contextmanager
def on_path(path: str):
    """Inside: ``path`` ("reference" or one of PATHS) is what its backend runs; yields the
    ``backend=`` value to pass."""
    env = {"LEVYATTN_COMPILE": "0" if path in ("tile loop", "reference") else "1"}
    with (
        warnings.catch_warnings(),
        mock.patch.dict(os.environ, env),
        mock.patch.object(tiled, "block_size", lambda *a, **k: 3),
        mock.patch.object(tiled, "CAUSAL_TILE_ROWS", 3),
        mock.patch.object(fused_cpu, "KEY_BLOCK", 4),
        mock.patch.object(fused_cpu, "query_block", lambda nq: 3),
        mock.patch.object(flex, "_compiled_flex", _eager_flex),
    ):
        # Uncompiled on purpose (see above): PyTorch's advice to compile is not news here.
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
        yield {"reference": "reference", "tile loop": "tiled", "fused kernel": "tiled"}.get(path, path)
