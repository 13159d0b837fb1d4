"""Shared settings for the translation/LM tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """Run these tiny models on one thread: on a shared 2-core machine, two intra-op
    threads contending with other processes made a 2 s training run take over a minute,
    and for d_model 64 one thread is as fast as two even on an idle machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
