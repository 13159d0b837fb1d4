"""A tiny task implementing the Task protocol, independent of levyattn.models, for trainer tests."""

from __future__ import annotations

import torch
from torch import nn


class ToyModel(nn.Module):
    model_type = "toy"

    def __init__(self, dim: int = 4, hidden: int = 8, classes: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "classes": classes, "dropout": dropout}
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ToyTask:
    name = "toy"
    model_type = "toy"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, n_train: int = 60, n_eval: int = 30, dropout: float = 0.1, model_type: str = "toy") -> None:
        self.n_train, self.n_eval = n_train, n_eval
        self.model_config = {"dim": 4, "hidden": 8, "classes": 3, "dropout": dropout}
        self.model_type = model_type

    def build_model(self) -> nn.Module:
        m = ToyModel(**self.model_config)
        m.model_type = self.model_type
        return m

    def datasets(self):
        # Draws from the global RNG on purpose: the trainer must not let that leak into training.
        x = torch.randn(self.n_train + self.n_eval, 4)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        data = list(zip(x, y))
        return data[: self.n_train], data[self.n_train :]

    def collate(self, samples):
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y), len(y)

    def evaluate(self, model, loader):
        correct = total = 0
        loss = 0.0
        for x, y in loader:
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
        return {"accuracy": correct / total, "loss": loss / total}


class Augmented:
    """A training set with random augmentation drawn in ``__getitem__`` from the global torch,
    ``random`` and NumPy generators: the sign of the features flipped with probability 1/2, then
    Gaussian jitter."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.data[i]
        sign = -1.0 if random.random() < 0.5 else 1.0
        jitter = 0.3 * torch.randn(4) + 0.1 * torch.from_numpy(np.random.standard_normal(4)).float()
        return sign * x + jitter, y


class AugmentedToyTask(ToyTask):
    """ToyTask whose training set is :class:`Augmented` and whose collation adds noise of standard
    deviation ``collate_noise`` (a draw that depends on the batch a process collates)."""

    def __init__(self, *args, collate_noise: float = 0.05, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.collate_noise = collate_noise

    def datasets(self):
        train, test = super().datasets()
        return Augmented(train), test

    def collate(self, samples):
        x, y = super().collate(samples)
        return (x + self.collate_noise * torch.randn_like(x) if self.collate_noise else x), y


def ddp_worker(rank: int, world: int, port: int, out_dir: str, cfg_dict: dict, n_train: int = 60,
               augmented: bool = False) -> None:
    """One process of a CPU DDP run (gloo) on ``n_train`` samples (of :class:`AugmentedToyTask` when
    ``augmented``, without collation noise); rank 0 saves the final parameters
    and its result (``result.json``), every rank its result and history (``result-<rank>.json``)."""
    import os

    from safetensors.torch import save_file

    from levyattn.training.distributed import cleanup, init_distributed
    from levyattn.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    info = init_distributed(device="cpu")
    try:
        task = (AugmentedToyTask(n_train=n_train, dropout=0.0, collate_noise=0.0) if augmented
                else ToyTask(n_train=n_train, dropout=0.0))
        trainer = Trainer(task, TrainConfig(**cfg_dict), out_dir, dist_info=info)
        result = trainer.fit()
        import json

        with open(os.path.join(out_dir, f"result-{rank}.json"), "w") as f:
            json.dump({k: result[k] for k in ("metrics", "train_loss", "global_step", "stopped", "history")}, f)
        if info.is_main:
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump({k: result[k] for k in ("metrics", "global_step")}, f)
            state = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
            save_file(state, os.path.join(out_dir, "final.safetensors"))
    finally:
        cleanup()
