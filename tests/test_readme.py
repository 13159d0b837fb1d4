"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4


def test_readme_python_examples_run():
    # The blocks build on each other (the module example uses the operator example's torch).
    namespace: dict = {}
    for block in BLOCKS:
        try:
            exec(compile(block, str(README), "exec"), namespace)
        except Exception as err:  # name the block that failed
            pytest.fail(f"README example failed with {type(err).__name__}: {err}\n{block}")
    assert tuple(namespace["out"].shape) == (2, 4, 1024, 64)
    assert tuple(namespace["weights"].shape) == (2, 4, 1024, 1024)
    assert tuple(namespace["y"].shape) == (4, 128, 256)
