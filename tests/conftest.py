"""Suite-wide settings.

On the CPU the tiled backend runs its Euclidean path through a fused C++ kernel built on first
use. The suite runs the tile loop instead (``LEVYATTN_COMPILE=0``), so the conformance tests
check the tile loop on small shapes and no test pays for the build by accident; subprocesses
inherit the setting. ``backends/test_fused_cpu.py`` turns the kernel back on and tests it.
"""

import pytest


@pytest.fixture(autouse=True)
def _tile_loop_attention(monkeypatch):
    monkeypatch.setenv("LEVYATTN_COMPILE", "0")
