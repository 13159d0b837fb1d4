"""A NaN in the data stops training with a named error, whatever attention path the model takes.

Attention once turned a NaN query or key into zeros on some paths (the fused CPU kernel among
them), so a corrupt sample trained on silently; now its rows are NaN, the loss is NaN and the
trainer's check fires.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy import ToyTask

from levyattn import fractional_attention
from levyattn.training.trainer import TrainConfig, Trainer


class AttentionModel(nn.Module):
    """Four features as four tokens of width 2 (queries and keys), learned values, one FNA
    layer, a linear head: the data reaches the output through the attention weights alone."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.embed = nn.Linear(1, 2)
        self.values = nn.Parameter(torch.randn(1, 1, 4, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.unsqueeze(-1)).unsqueeze(1)  # (B, 1, 4, 2)
        values = self.values.expand(len(x), -1, -1, -1)
        mixed = fractional_attention(tokens, tokens, values, alpha=1.2, backend=self.backend)
        return self.head(mixed.flatten(1))


class CorruptTask(ToyTask):
    """The toy task with a NaN in one feature of one training sample."""

    def __init__(self, backend: str) -> None:
        super().__init__(n_train=16, n_eval=8)
        self.backend = backend

    def build_model(self) -> nn.Module:
        model = AttentionModel(self.backend)
        model.model_type = self.model_type
        return model

    def datasets(self):
        train, evaluation = super().datasets()
        x, y = train[5]
        train[5] = (x.clone().index_fill_(0, torch.tensor([2]), float("nan")), y)
        return train, evaluation


@pytest.mark.parametrize("kernel", ["fused kernel", "tile loop"])
@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
def test_a_nan_in_the_data_stops_training_with_a_named_error(monkeypatch, tmp_path, kernel, backend):
    if kernel == "fused kernel":
        monkeypatch.delenv("LEVYATTN_COMPILE", raising=False)
    config = TrainConfig(epochs=1, batch_size=16, eval_batch_size=8, lr=1e-2, seed=0, checkpoint_every=0)
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        Trainer(CorruptTask(backend), config, tmp_path).fit()
