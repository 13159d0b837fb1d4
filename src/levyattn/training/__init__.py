"""Training: the trainer, checkpoints, data parallelism, the paper's presets and sweeps.

- :class:`Trainer` / :class:`TrainConfig` — AdamW, warmup + cosine or step schedule,
  gradient clipping, evaluation every epoch, metrics to CSV/JSONL, exact resume.
- :mod:`~levyattn.training.tasks` — the Task protocol and the preset format;
  ``tasks.classification`` (text, images, synthetic multiscale).
- :mod:`~levyattn.training.checkpoint` — safetensors + JSON, atomic, no pickle.
- :mod:`~levyattn.training.distributed` — ``torchrun`` + DistributedDataParallel.
- :mod:`~levyattn.training.presets` — every preset by name, ``--set`` overrides.
- :mod:`~levyattn.training.sweep` — grids over alpha x attention x seed with resumable
  per-run results, tables, spectral gaps and the accuracy-gap correlation.
- :mod:`~levyattn.training.inputs` — a trained model's inputs read from files (token ids,
  images) and :func:`~levyattn.training.inputs.checkpoint_attention`, its attention on them.
"""

from levyattn.training.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from levyattn.training.tasks import Task, make_task
from levyattn.training.trainer import TrainConfig, Trainer

__all__ = [
    "CheckpointError",
    "Task",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "load_model",
    "make_task",
    "save_checkpoint",
]
