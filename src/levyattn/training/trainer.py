"""The trainer: AdamW, warmup + cosine or a step schedule, clipping, per-epoch evaluation.

One loop for every task (see :mod:`levyattn.training.tasks` for the Task protocol).
What it guarantees:

- **Reproducible**: the same seed gives the same metrics on CPU. The model is built
  right after ``torch.manual_seed(seed)``; epoch ``e`` visits the training set in the
  order ``randperm(n, generator=seed(seed, e))``, independent of anything else.
- **Exact resume**: the checkpoint stores the model, the optimiser, every RNG, the
  position (epoch, step within the epoch) and the running loss sums, so a run killed
  mid-epoch and resumed replays the rest of the epoch in the same order and ends with
  the same metrics as a run that was never interrupted.
- **Data parallel**: under ``torchrun`` the model is wrapped in
  DistributedDataParallel and each *global* batch of ``batch_size`` samples is
  split across the processes; each process's loss is reweighted by its share of the
  batch so the averaged gradient equals the one-process gradient.

Files written to ``out_dir`` (by the main process, atomically): ``config.json``,
``metrics.jsonl`` and ``metrics.csv`` (one row per epoch), ``checkpoint.json`` +
``ckpt-<step>.safetensors``, whatever ``task.save_artifacts(out_dir)`` writes (when the
task has that method, e.g. a tokenizer; called once, right after ``config.json``), and
TensorBoard events if asked for.

Learning-rate schedules (``TrainConfig.schedule``), ``s`` = optimiser step:

- ``"cosine"``: linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to
  ``lr * min_lr_ratio`` at the last step;
- ``"step"``: the reference code's schedule, ``lr * step_gamma ** (epoch // step_epochs)``
  (``step_gamma = 0.75``: "lr x3/4 step"), after the optional warmup;
- ``"constant"``: ``lr`` after the optional warmup.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from levyattn.io import atomic_write_json, atomic_write_text
from levyattn.models import count_parameters
from levyattn.training import checkpoint as ckpt_mod
from levyattn.training.distributed import DistInfo, all_reduce_sum, barrier, current
from levyattn.training.tasks import Task, check_task

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is the global batch (summed over processes)."""

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_gamma: float = 0.75
    step_epochs: int = 1
    grad_clip: float | None = 1.0
    seed: int = 0
    max_steps: int | None = None
    checkpoint_every: int = 0
    checkpoint: bool = True
    num_workers: int = 0
    device: str = "auto"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives lists back
        for name in ("epochs", "batch_size", "eval_batch_size", "step_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.step_gamma <= 1:
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an integer >= 1 or None, got {self.max_steps!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate for optimiser step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.lr * cfg.step_gamma ** (epoch // cfg.step_epochs)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training set in ``epoch``: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + 17)
    return torch.randperm(n, generator=g)


def global_batches(n: int, batch_size: int, seed: int, epoch: int, world_size: int = 1) -> list[list[int]]:
    """The epoch's global batches as index lists. A last batch smaller than the number
    of processes is dropped (every process needs at least one sample per step)."""
    if batch_size < world_size:
        raise ValueError(
            f"batch_size (the global batch) must be >= the number of processes {world_size}, got {batch_size}"
        )
    order = epoch_order(n, seed, epoch).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < world_size:
        batches.pop()
    return batches


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


def _rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class _Shards(torch.utils.data.Sampler):
    """Batch sampler: this process's share ``batch[rank::world]`` of each global batch."""

    def __init__(self, batches: list[list[int]], rank: int, world: int) -> None:
        self.shards = [b[rank::world] for b in batches]

    def __iter__(self):
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)


class Trainer:
    """Train ``task`` with ``config``; write logs and checkpoints to ``out_dir``.

    ``resume=True`` continues from ``out_dir``'s checkpoint when there is one.
    ``progress=True`` shows tqdm bars (on the main process, when stderr is a terminal). ``extra`` (JSON) is stored in
    every checkpoint, e.g. the preset, so ``levyattn train --resume DIR`` can rebuild the task.
    ``on_epoch_end(record)`` is called with each epoch's metrics record.
    """

    def __init__(
        self,
        task: Task,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool = False,
        extra: dict[str, Any] | None = None,
        dist_info: DistInfo | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        check_task(task)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.task = task
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        self.progress = progress
        self.extra = extra or {}
        self.dist = dist_info or current()
        self.on_epoch_end = on_epoch_end
        if config.device == "auto":
            self.device = self.dist.device if self.dist.device.type == "cuda" else (
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            )
        else:
            self.device = torch.device(config.device)
        self.history: list[dict[str, Any]] = []
        self.model: nn.Module | None = None

    # ------------------------------------------------------------------ helpers

    def _write_logs(self) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        import json

        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        atomic_write_text(self.out_dir / "metrics.csv", _rows_to_csv(self.history))

    def _save(self, model, optimizer, position: dict[str, Any]) -> None:
        if self.out_dir is None or not self.config.checkpoint:
            return
        if self.dist.is_main:
            ckpt_mod.save_checkpoint(
                self.out_dir,
                model=model,
                model_type=self.task.model_type,
                model_config=self.task.model_config,
                optimizer=optimizer,
                position=position,
                history=self.history,
                extra={"train_config": self.config.to_dict(), **self.extra},
            )
        barrier()

    # ------------------------------------------------------------------ main loop

    def fit(self) -> dict[str, Any]:
        """Train (or continue training); return the final metrics and a summary.

        Returns a dict with ``metrics`` (the last evaluation), ``history`` (one record
        per epoch), ``params``, ``train_time_s``, ``samples_per_s``, ``global_step`` and
        ``stopped`` (True when ``max_steps`` ended the run before its last epoch).
        """
        import random

        import numpy as np

        cfg, task, dist = self.config, self.task, self.dist
        # Datasets first: building them may draw random numbers (synthetic tasks, splits),
        # and the model's initialisation must not depend on how many.
        torch.manual_seed(cfg.seed)
        train_ds, eval_ds = task.datasets()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = task.build_model().to(self.device)
        self.model = model
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                # Biases, norms and scalar parameters (alpha, bandwidth) are not decayed.
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

        rng_to_restore = None
        position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "weight_sum": 0.0,
                    "train_time_s": 0.0, "samples": 0, "seed": cfg.seed}
        if self.resume and self.out_dir is not None and ckpt_mod.has_checkpoint(self.out_dir):
            ck = ckpt_mod.load_checkpoint(self.out_dir)
            ckpt_mod.load_model_state(model, ck, task.model_type)
            if ck.model_config != task.model_config:
                raise ckpt_mod.CheckpointError(
                    f"checkpoint {ck.path} was written for model config {ck.model_config}, "
                    f"the task builds {task.model_config}"
                )
            ckpt_mod.optimizer_from_flat(optimizer, ck.tensors, ck.state["optimizer"])
            position.update(ck.state["position"])
            self.history = list(ck.state["history"])
            rng_to_restore = (ck.tensors, ck.state["rng"])
            if not dist.is_main:
                # The saved running sums are global; count them once.
                position["loss_sum"], position["weight_sum"], position["samples"] = 0.0, 0.0, 0
        elif self.out_dir is not None and dist.is_main:
            atomic_write_json(
                self.out_dir / "config.json",
                {"model_type": task.model_type, "model_config": task.model_config,
                 "train_config": cfg.to_dict(), **self.extra},
            )
            # Files the task needs at inference (e.g. a tokenizer) go beside the checkpoint,
            # so that a finished run folder is self-contained.
            save_artifacts = getattr(task, "save_artifacts", None)
            if callable(save_artifacts):
                save_artifacts(self.out_dir)

        train_model: nn.Module = model
        if dist.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        n_train = len(train_ds)
        if n_train < dist.world_size:
            raise ValueError(f"the training set has {n_train} samples, fewer than {dist.world_size} processes")
        steps_per_epoch = len(global_batches(n_train, cfg.batch_size, cfg.seed, 0, dist.world_size))
        total_steps = steps_per_epoch * cfg.epochs
        eval_loader = torch.utils.data.DataLoader(
            eval_ds, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=task.collate,
            num_workers=cfg.num_workers,
        )
        writer = self._tensorboard()
        if rng_to_restore is not None:
            # Restored last, right before the loop, so nothing above can disturb it.
            ckpt_mod.set_rng_state(*rng_to_restore)
        stopped = False
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        while position["epoch"] < cfg.epochs and not stopped:
            epoch = position["epoch"]
            batches = global_batches(n_train, cfg.batch_size, cfg.seed, epoch, dist.world_size)
            batches = batches[position["step_in_epoch"] :]
            loader = torch.utils.data.DataLoader(
                train_ds, batch_sampler=_Shards(batches, dist.rank, dist.world_size),
                collate_fn=task.collate, num_workers=cfg.num_workers,
            )
            bar = None
            if self.progress and dist.is_main and tqdm is not None:
                # disable=None: no bar when stderr is not a terminal, so piped logs carry no redraws
                bar = tqdm(total=steps_per_epoch, initial=position["step_in_epoch"], disable=None,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
            model.train()
            t0 = time.perf_counter()
            for batch in loader:
                if cfg.max_steps is not None and position["global_step"] >= cfg.max_steps:
                    stopped = True
                    break
                lr = lr_at(cfg, position["global_step"], total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = to_device(batch, self.device)
                loss, weight = task.loss(train_model, batch)
                weight = float(weight)
                total_weight = all_reduce_sum(weight, self.device) if dist.enabled else weight
                if total_weight <= 0:
                    raise ValueError("a training batch has zero loss weight (no samples or no target tokens)")
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss is {loss.item()} at step {position['global_step']} (epoch {epoch + 1}); "
                        "try a lower lr or grad_clip"
                    )
                # DDP averages gradients over processes; scaling by weight * world / total makes
                # that average the gradient of the mean loss over the whole global batch.
                objective = loss * (weight * dist.world_size / total_weight)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                position["loss_sum"] += float(loss.detach()) * weight
                position["weight_sum"] += weight
                position["samples"] += _batch_len(batch)
                position["global_step"] += 1
                position["step_in_epoch"] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
                if cfg.checkpoint_every and position["global_step"] % cfg.checkpoint_every == 0 \
                        and position["step_in_epoch"] < steps_per_epoch:
                    position["train_time_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self._reduce_running(position)
                    self._save(model, optimizer, position)
            position["train_time_s"] += time.perf_counter() - t0
            if bar is not None:
                bar.close()
            if stopped:
                break
            self._reduce_running(position)
            record = {"epoch": epoch + 1, "step": position["global_step"],
                      "lr": optimizer.param_groups[0]["lr"],
                      "train_loss": position["loss_sum"] / max(position["weight_sum"], 1e-12)}
            if dist.is_main:
                model.eval()
                with torch.no_grad():
                    metrics = task.evaluate(model, _DeviceLoader(eval_loader, self.device))
                record.update({f"eval_{k}": float(v) for k, v in metrics.items()})
            record["train_time_s"] = position["train_time_s"]
            record["samples_per_s"] = position["samples"] / max(position["train_time_s"], 1e-9)
            self.history.append(record)
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, position["global_step"])
            position.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, weight_sum=0.0)
            self._write_logs()
            self._save(model, optimizer, position)
            if self.on_epoch_end is not None and dist.is_main:
                self.on_epoch_end(record)
        if writer is not None:
            writer.close()
        last = self.history[-1] if self.history else {}
        metrics = {k[len("eval_") :]: v for k, v in last.items() if k.startswith("eval_")}
        return {
            "metrics": metrics,
            "history": list(self.history),
            "params": count_parameters(model),
            "train_time_s": position["train_time_s"],
            "samples_per_s": position["samples"] / max(position["train_time_s"], 1e-9),
            "global_step": position["global_step"],
            "stopped": stopped,
        }

    def _reduce_running(self, position: dict[str, Any]) -> None:
        """Make the running loss sums global on the main process (zero elsewhere)."""
        if not self.dist.enabled:
            return
        for key in ("loss_sum", "weight_sum", "samples"):
            total = all_reduce_sum(position[key], self.device)
            position[key] = (int(total) if key == "samples" else total) if self.dist.is_main else 0

    def _tensorboard(self):
        if not self.config.tensorboard or self.out_dir is None or not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("tensorboard=True needs the 'tensorboard' package (pip install tensorboard)") from err
        return SummaryWriter(str(self.out_dir / "tensorboard"))


def _batch_len(batch: Any) -> int:
    """Number of samples in a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            if isinstance(item, torch.Tensor | Mapping | list | tuple):
                return _batch_len(item)
    return 0


class _DeviceLoader:
    """Wraps a loader so that its batches arrive on the trainer's device."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)


__all__ = ["SCHEDULES", "TrainConfig", "Trainer", "epoch_order", "global_batches", "lr_at"]
