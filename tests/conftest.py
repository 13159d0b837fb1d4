"""Suite-wide settings.

The tiled backend compiles its Euclidean path with ``torch.compile`` on the CPU, seconds per
variant (dtype, masks, grad mode). The suite runs it uncompiled, so the conformance tests check
the tile loop on small shapes and no test pays for compilation by accident; subprocesses inherit
the setting. ``test_tiled_compiled.py`` turns compilation back on and tests the compiled paths.
"""

import pytest


@pytest.fixture(autouse=True)
def _uncompiled_attention(monkeypatch):
    monkeypatch.setenv("LEVYATTN_COMPILE", "0")
