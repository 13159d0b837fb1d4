"""Fixtures of the training tests; the test helpers (toy.py, fault_worker.py) are importable."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only; as root, where permission bits do not stop writes, also make
    every temporary file the project creates in it fail as a read-only folder would."""
    made = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and any(Path(dir).resolve() == p for p in made):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kw)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder.resolve())
        if os.geteuid() == 0:
            monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one thread: on a shared 2-core machine, two intra-op
    threads contending with other processes made a 2 s training run take over a minute,
    and for d_model 64 one thread is as fast as two even on an idle machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
