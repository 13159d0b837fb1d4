"""The fused CPU kernel's one-time build: announced, in a folder of its own per source, flags and
versions (so checkouts do not rebuild each other's), and available up front."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils.cpp_extension

import levyattn.backends.fused_cpu as fused_cpu

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """A fresh kernel state, builds under ``tmp_path``, and a ``load`` that records its arguments
    and writes the library file instead of compiling."""
    monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fused_cpu, "_state", {})
    calls = []

    def load(**kw):
        calls.append(kw)
        (Path(kw["build_directory"]) / f"{kw['name']}.so").write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    return calls


def test_the_first_build_is_announced_and_a_cached_one_is_not(fake_build, monkeypatch, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="levyattn"):
        assert fused_cpu.ensure_built()
    build_dir = Path(fake_build[0]["build_directory"])
    assert build_dir.parent == tmp_path and build_dir.name == fake_build[0]["name"]
    # Compiled from a copy in the build folder: its path, in ninja's build file, is the same for every checkout.
    copy = build_dir / "fna_cpu.cpp"
    assert fake_build[0]["sources"] == [str(copy)] and copy.read_bytes() == fused_cpu._SOURCE.read_bytes()
    written = copy.stat().st_mtime_ns
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"building the CPU kernel once (about 30 s; cached in {build_dir})"
    assert messages[1].startswith("built the CPU kernel in ")

    caplog.clear()
    monkeypatch.setattr(fused_cpu, "_state", {})  # a new process, the build cached
    with caplog.at_level(logging.INFO, logger="levyattn"):
        assert fused_cpu.ensure_built()
    assert caplog.records == [] and len(fake_build) == 2
    assert copy.stat().st_mtime_ns == written  # not rewritten: ninja would rebuild a newer source


def test_ensure_built_builds_nothing_when_compiling_is_off(fake_build, monkeypatch):
    monkeypatch.setenv("LEVYATTN_COMPILE", "0")
    assert not fused_cpu.ensure_built()
    assert fake_build == []


def test_each_source_and_flag_set_gets_its_own_build_folder_and_checkouts_share_one(fake_build, monkeypatch):
    def build_folder() -> str:
        monkeypatch.setattr(fused_cpu, "_state", {})  # a new process
        assert fused_cpu.ensure_built()
        return fake_build[-1]["build_directory"]

    first = build_folder()
    other = Path(first).parent.parent / "other-checkout" / "fna_cpu.cpp"  # the same source in another checkout
    other.parent.mkdir()
    shutil.copy(fused_cpu._SOURCE, other)
    monkeypatch.setattr(fused_cpu, "_SOURCE", other)
    assert build_folder() == first
    other.write_text(other.read_text() + "\n// another version\n")
    changed = build_folder()
    assert changed != first and Path(changed).name.startswith("levyattn_fna_cpu_")
    monkeypatch.setenv("CXX", "another-compiler")
    assert build_folder() not in (first, changed)


def test_the_cli_shows_the_build_on_stderr(tmp_path):
    """A first FNA run on the CPU says that it is building the kernel (here the build fails at once,
    as without a compiler, and training runs the tile loop)."""
    code = (
        "import sys, torch.utils.cpp_extension as ext\n"
        "def load(**kw): raise RuntimeError('no C++ compiler found')\n"
        "ext.load = load\n"
        "from levyattn.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "LEVYATTN_COMPILE": "1"}
    argv = ["train", "--preset", "digits-vit", "--set", "epochs=1", "--set", "max_steps=1", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "levyattn: building the CPU kernel once (about 30 s; cached in " in result.stderr
    assert "no C++ compiler found" in result.stderr
