"""Suite-wide settings.

On the CPU the tiled backend runs its Euclidean path through a fused C++ kernel built on first
use. The suite runs the tile loop instead (``LEVYATTN_COMPILE=0``), so the conformance tests
check the tile loop on small shapes and no test pays for the build by accident; subprocesses
inherit the setting. ``backends/test_fused_cpu.py`` turns the kernel back on and tests it.
"""

import sys
import types

import pytest


@pytest.fixture(autouse=True)
def _tile_loop_attention(monkeypatch):
    monkeypatch.setenv("LEVYATTN_COMPILE", "0")


@pytest.fixture
def hub_copy(monkeypatch):
    """``serve(data)``: ``datasets.load_dataset`` returns ``data`` (``{split: {column: list}}``, the
    hub's layout) without the network; returns the list of ``(name, keyword arguments)`` it was asked."""

    def serve(data):
        asked = []
        fake = types.SimpleNamespace(load_dataset=lambda name, **kw: asked.append((name, kw)) or data)
        monkeypatch.setitem(sys.modules, "datasets", fake)
        return asked

    return serve
