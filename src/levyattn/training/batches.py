"""Which samples a process loads in each step, and how a batch is fetched, seeded and moved to the device.

What it guarantees (the :class:`~levyattn.training.trainer.Trainer` loads every batch through it):

- **The batch order is a function of (seed, epoch) only**: epoch ``e`` visits the training set in
  the order ``randperm(n, generator=seed(seed, e))`` (:func:`epoch_order`), cut into global batches
  of ``batch_size`` samples (:func:`global_batches`), the same for any number of processes. Under
  ``torchrun`` process ``rank`` loads its share ``batch[rank::world]`` of each global batch.
- **Stand-in samples**: where a last batch has fewer samples than there are processes, those
  without one load the batch's first sample as a stand-in, which the trainer weighs 0
  (:func:`is_stand_in`): every process must take every step, since DistributedDataParallel
  averages the gradients of all of them.
- **Random data augmentation is reproducible**: a dataset's ``__getitem__`` and the task's
  ``collate`` may draw from the global torch (CPU), ``random`` and NumPy generators. Each sample
  is fetched with them seeded from (seed, epoch, sample index) and each batch collated with them
  seeded from (seed, epoch, step, rank), then torch's state is put back (dropout draws from it)
  (:class:`_SeededBatches`). What a sample draws is therefore the same in every process and data
  loader worker, for any ``num_workers`` and number of processes (what ``collate`` draws, for any
  ``num_workers``), and a resumed run draws what the uninterrupted run drew, with nothing to
  checkpoint (the workers' own generators would be reseeded when a resumed run starts its loader
  mid-epoch). A dataset whose items draw nothing says so with ``draws_random_numbers = False``
  beside its ``__getitem__`` (levyattn's datasets do, images with augmentation excepted) and its
  samples are fetched without the per-sample seeding, which costs about 13 us a sample
  (:func:`draws_random_numbers`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training set in ``epoch``: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + 17)
    return torch.randperm(n, generator=g)


def global_batches(n: int, batch_size: int, seed: int, epoch: int, world_size: int = 1) -> list[list[int]]:
    """The epoch's global batches as index lists: the same for any number of processes (a last
    batch smaller than the number of processes is kept; see :func:`train_batch_keys`)."""
    if batch_size < world_size:
        raise ValueError(
            f"batch_size (the global batch) must be >= the number of processes {world_size}, got {batch_size}"
        )
    order = epoch_order(n, seed, epoch).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def is_stand_in(batch: list[int], rank: int) -> bool:
    """Whether process ``rank`` has no share of the global ``batch`` (see :func:`train_batch_keys`)."""
    return len(batch) <= rank


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# Streams of seeds (see :func:`draw_seeds`): the training samples, the training batches, the evaluation.
_TRAIN_SAMPLES, _TRAIN_BATCHES, _EVAL = 0, 1, 2


def draw_seeds(count: int, *key: int) -> np.ndarray:
    """``count`` 32-bit seeds (uint32, shape (count,)) that are a function of ``key`` only (NumPy's
    ``SeedSequence``)."""
    return np.random.SeedSequence(list(key)).generate_state(count)


def _seed_generators(seed: int) -> None:
    """Seed the generators a dataset or a collate function draws from: torch's CPU one (not CUDA's,
    which the training step uses), ``random`` and NumPy's."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def draws_random_numbers(dataset: Any) -> bool:
    """Whether fetching an item of ``dataset`` may draw random numbers: True unless the class that
    defines its ``__getitem__`` also defines ``draws_random_numbers`` and it reads False. Read from
    that class so that a subclass with a ``__getitem__`` of its own is seeded until it says otherwise."""
    owner = next((c for c in type(dataset).__mro__ if "__getitem__" in c.__dict__), None)
    if owner is None or "draws_random_numbers" not in owner.__dict__:
        return True
    return bool(dataset.draws_random_numbers)


class _SeededBatches(torch.utils.data.Dataset):
    """Whole batches of ``dataset``: item ``(batch_seed, indices, sample_seeds)`` is
    ``collate([dataset[i] for i in indices])``, each sample fetched with the generators seeded from
    its seed (:func:`_seed_generators`; not when the dataset draws nothing, :func:`draws_random_numbers`)
    and the collation from ``batch_seed``. Torch's generator in the process that loads the batch (the
    main one when ``num_workers`` is 0) is left as it was: the training step's dropout draws from it.
    ``random`` and NumPy are left as the batch's seeding set them, as reproducible as any state and
    cheaper: saving and restoring NumPy's state costs about 0.1-0.3 ms, several times the seeding."""

    def __init__(self, dataset: Any, collate: Callable[[list], Any]) -> None:
        self.dataset, self.collate = dataset, collate
        self.seed_samples = draws_random_numbers(dataset)

    def __getitem__(self, key: tuple[int, list[int], list[int]]) -> Any:
        batch_seed, indices, sample_seeds = key
        torch_state = torch.get_rng_state()
        try:
            samples = []
            for i, sample_seed in zip(indices, sample_seeds, strict=True):
                if self.seed_samples:
                    _seed_generators(sample_seed)
                samples.append(self.dataset[i])
            _seed_generators(batch_seed)
            return self.collate(samples)
        finally:
            torch.set_rng_state(torch_state)


def _as_loaded(batch: Any) -> Any:
    """The DataLoader's collate function for :class:`_SeededBatches`, whose items are collated already."""
    return batch


def _batch_loader(dataset: Any, collate: Callable[[list], Any], keys: list[tuple[int, list[int], list[int]]],
                  num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader of the batches ``keys`` name (see :class:`_SeededBatches`)."""
    return torch.utils.data.DataLoader(_SeededBatches(dataset, collate), sampler=keys, batch_size=None,
                                       collate_fn=_as_loaded, num_workers=num_workers)


def train_batch_keys(batches: list[list[int]], n: int, seed: int, epoch: int, rank: int, world: int,
                     first_step: int = 0) -> list[tuple[int, list[int], list[int]]]:
    """The :class:`_SeededBatches` keys of process ``rank``'s share ``batch[rank::world]`` of each global
    batch of ``epoch`` from step ``first_step`` on (``batches`` are the epoch's, from
    :func:`global_batches`). A process whose share of a (last, small) batch is empty gets the batch's
    first sample as a stand-in, which the trainer weighs 0 (:func:`is_stand_in`): every process must
    take every step, since DistributedDataParallel averages the gradients of all of them."""
    sample_seeds = draw_seeds(n, seed, _TRAIN_SAMPLES, epoch)
    batch_seeds = draw_seeds(len(batches), seed, _TRAIN_BATCHES, epoch, rank)
    keys = []
    for step in range(first_step, len(batches)):
        shard = batches[step][rank::world] or batches[step][:1]
        keys.append((int(batch_seeds[step]), shard, sample_seeds[shard].tolist()))
    return keys


def eval_batch_keys(n: int, batch_size: int, seed: int) -> list[tuple[int, list[int], list[int]]]:
    """The :class:`_SeededBatches` keys of the evaluation set in order: the same at every evaluation."""
    sample_seeds = draw_seeds(n, seed, _EVAL)
    batch_seeds = draw_seeds(-(-n // batch_size), seed, _EVAL, 1)
    return [(int(batch_seeds[b]), list(range(i, min(i + batch_size, n))), sample_seeds[i : i + batch_size].tolist())
            for b, i in enumerate(range(0, n, batch_size))]


class _DeviceLoader:
    """Wraps a loader so that its batches arrive on the trainer's device."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)


__all__ = ["draw_seeds", "draws_random_numbers", "epoch_order", "eval_batch_keys", "global_batches", "is_stand_in",
           "to_device", "train_batch_keys"]
