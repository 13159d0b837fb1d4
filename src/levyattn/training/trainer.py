"""The trainer: AdamW, warmup + cosine or a step schedule, clipping, per-epoch evaluation.

One loop for every task (see :mod:`levyattn.training.tasks` for the Task protocol).
What it guarantees:

- **Reproducible**: the same seed gives the same metrics on CPU. The model is built
  right after ``torch.manual_seed(seed)``; the batch order, stand-in samples and per-sample
  seeding of data augmentation are :mod:`levyattn.training.batches`'s.
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

No run is lost or silently restarted. Before any work the trainer checks the run folder:

- a new run (``resume=False``) refuses a folder that already holds a run
  (:data:`RUN_FILES`, ``ckpt-*.safetensors``) unless ``overwrite=True``, which deletes
  that run first (its ``checkpoint.json`` before anything else);
- ``resume=True`` needs ``checkpoint.json``; without it (a run killed before its first
  checkpoint, or a file removed) it raises FileNotFoundError naming the file and changes
  nothing. The checkpoint is checked field by field (see
  :func:`levyattn.training.checkpoint.check_training_state`) and against this run: the same
  training settings and model config (:func:`resume_changes`: only those of
  :data:`RESUME_NEUTRAL` may change), a position that fits the steps per epoch and the history,
  and no more steps trained than ``epochs`` and ``max_steps`` now ask for;
- the folder must be writable, so that a read-only folder fails before the training
  time is spent, not at the first checkpoint.

What a killed save left behind (temporary files, tensors files no ``checkpoint.json``
names) is removed when a run starts or resumes.

Learning-rate schedules (``TrainConfig.schedule``), ``s`` = optimiser step:

- ``"cosine"``: linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to
  ``lr * min_lr_ratio`` at the last step;
- ``"step"``: the reference code's schedule, ``lr * step_gamma ** (epoch // step_epochs)``
  (``step_gamma = 0.75``: "lr x3/4 step"), after the optional warmup;
- ``"constant"``: ``lr`` after the optional warmup.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from levyattn.io import (
    atomic_write_json,
    atomic_write_text,
    check_writable,
    fsync_dir,
    remove_stale_temporaries,
    rows_to_csv,
)
from levyattn.models import count_parameters
from levyattn.training import checkpoint as ckpt_mod
from levyattn.training.batches import (
    _batch_loader,
    _DeviceLoader,
    eval_batch_keys,
    global_batches,
    is_stand_in,
    to_device,
    train_batch_keys,
)
from levyattn.training.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, current
from levyattn.training.progress import EpochProgress
from levyattn.training.tasks import Task, check_task

SCHEDULES = ("cosine", "step", "constant")
# The files that make a folder a run folder (with ckpt-*.safetensors), checkpoint.json first:
# it is the commit point, so it goes first when a run is overwritten.
RUN_FILES = (ckpt_mod.JSON_NAME, "config.json", "metrics.jsonl", "metrics.csv")


# Training settings a resumed run may change: none of them changes what a step computes.
# ``epochs`` too, except under the cosine schedule, whose learning rate it shapes.
RESUME_NEUTRAL = ("epochs", "max_steps", "eval_batch_size", "checkpoint_every", "checkpoint", "num_workers", "device",
                  "tensorboard")


class RunFolderError(ValueError):
    """A run folder cannot be used as asked: it holds a run that would be overwritten."""


def existing_run_files(out_dir: str | Path) -> list[str]:
    """The names of the files in ``out_dir`` that belong to a run (empty when it has none)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    names = [n for n in RUN_FILES if (out_dir / n).is_file()]
    return names + sorted(p.name for p in out_dir.glob(ckpt_mod.TENSORS_GLOB))


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
        # Checked here, not by AdamW: that would refuse them only once the data is loaded.
        if not isinstance(self.betas, tuple | list) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if any(isinstance(b, bool) or not isinstance(b, int | float) for b in self.betas):
            raise TypeError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(self.betas)  # JSON gives lists back
        for name in ("epochs", "batch_size", "eval_batch_size", "step_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        # A boolean is no number here (True would train with lr 1 or stop after one step).
        for name in ("lr", "weight_decay", "step_gamma", "min_lr_ratio", "grad_clip", "max_steps"):
            if isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a number, got {getattr(self, name)!r}")
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


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any], neutral: tuple[str, ...] = (),
                     prefix: str = "") -> list[str]:
    """``"<prefix><key>: <saved> -> <now>"`` for every key outside ``neutral`` whose value differs
    (a key one side lacks shows as ``<unset>``), in sorted key order."""
    missing = "<unset>"
    return [f"{prefix}{k}: {saved.get(k, missing)!r} -> {now.get(k, missing)!r}"
            for k in sorted(set(saved) | set(now), key=str)
            if k not in neutral and saved.get(k, missing) != now.get(k, missing)]


def resume_changes(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """The training settings ``now`` changes from ``saved`` that a resumed run may not change
    (see :data:`RESUME_NEUTRAL`), as ``"name: saved -> now"``."""
    neutral = tuple(k for k in RESUME_NEUTRAL if not (k == "epochs" and "cosine" in (saved.schedule, now.schedule)))
    return changed_settings(saved.to_dict(), now.to_dict(), neutral)


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


def _mean_train_loss(position: dict[str, Any]) -> float:
    """The weighted mean training loss since the epoch began (its sums made global by ``_reduce_running``)."""
    return position["loss_sum"] / max(position["weight_sum"], 1e-12)


class Trainer:
    """Train ``task`` with ``config``; write logs and checkpoints to ``out_dir``.

    ``resume=True`` continues the run in ``out_dir`` from its checkpoint (FileNotFoundError
    when there is none); ``resume=False`` starts a run, in a folder that holds none unless
    ``overwrite=True`` (:class:`RunFolderError` otherwise). See the module docstring.
    ``progress=True`` shows progress on the main process (:mod:`~levyattn.training.progress`: tqdm bars on a
    terminal, plain lines on the ``levyattn`` logger otherwise). ``extra`` (JSON) is stored in
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
        overwrite: bool = False,
        progress: bool = False,
        extra: dict[str, Any] | None = None,
        dist_info: DistInfo | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        check_task(task)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if resume and overwrite:
            raise ValueError("resume=True and overwrite=True contradict each other: continue the run or replace it")
        if resume and out_dir is None:
            raise ValueError("resume=True needs out_dir, the folder of the run to continue")
        self.task = task
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        self.overwrite = overwrite
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
        atomic_write_text(self.out_dir / "metrics.csv", rows_to_csv(self.history))

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

    def _prepare_out_dir(self) -> None:
        """Check the run folder before any work (see the module docstring); then, on the main
        process, delete an overwritten run and what killed saves left behind in a new run's
        folder (a resumed run's folder is cleaned once its checkpoint has passed its checks)."""
        out = self.out_dir
        if out is None:
            return
        files = existing_run_files(out)
        if self.resume and ckpt_mod.JSON_NAME not in files:
            found = f"it holds {', '.join(files)}" if files else "it holds no run" if out.is_dir() else "no such folder"
            raise FileNotFoundError(
                f"cannot resume {out}: {out / ckpt_mod.JSON_NAME} not found ({found}); nothing was changed. "
                "A run killed before its first checkpoint can only start over (overwrite=True, levyattn train "
                "--overwrite)"
            )
        if not self.resume and files and not self.overwrite:
            raise RunFolderError(
                f"{out} already holds a run ({', '.join(files)}); nothing was changed. Continue it with resume=True "
                f"(levyattn train --resume {out}) or replace it with overwrite=True (levyattn train --overwrite)"
            )
        # Every process has checked before the main one changes anything.
        barrier()
        if self.dist.is_main:
            check_writable(out, "run folder")
            if not self.resume:
                for name in files:  # checkpoint.json first: without it nothing can resume the old run
                    (out / name).unlink()
                fsync_dir(out)
                remove_stale_temporaries(out)
        barrier()

    def _resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, position: dict[str, Any],
                steps_per_epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load the checkpoint into ``model``, ``optimizer``, ``position`` and the history, after
        checking that it fits this run; return the RNG states to restore before the first step."""
        task, cfg = self.task, self.config
        ck = ckpt_mod.load_checkpoint(self.out_dir)
        where = f"checkpoint {ck.path / ckpt_mod.JSON_NAME}"
        ckpt_mod.check_model_type(ck, task.model_type)
        try:
            saved_cfg = TrainConfig.from_dict(ck.state["extra"]["train_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise ckpt_mod.CheckpointError(
                f"{where} does not record valid training settings (extra.train_config): {err}"
            ) from err
        # Resuming continues the same training: a changed setting would be silently overridden
        # by the optimiser state (weight_decay, betas) or change the run mid-way (lr, seed, ...).
        changes = resume_changes(saved_cfg, cfg) + changed_settings(ck.model_config, task.model_config,
                                                                    prefix="model config ")
        if changes:
            raise ckpt_mod.CheckpointError(
                f"{where} was trained with other settings than this run: {'; '.join(changes)}. A resumed run "
                f"may change only {', '.join(RESUME_NEUTRAL)} (epochs not under the cosine schedule); train "
                "the new settings as a new run (another folder, or overwrite)"
            )
        ckpt_mod.load_model_state(model, ck, task.model_type)
        saved = ckpt_mod.check_training_state(ck)
        epoch, step, global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
        if saved["seed"] != cfg.seed:
            raise ckpt_mod.CheckpointError(
                f"{where} was trained with seed {saved['seed']}, this run has seed {cfg.seed}: the batch order "
                "would change mid-run"
            )
        # The position must be one this run can reach: otherwise the resumed run would train
        # on the wrong batches, or on none (an epoch logged with train_loss 0.0).
        if not (step < steps_per_epoch and global_step == epoch * steps_per_epoch + step):
            raise ckpt_mod.CheckpointError(
                f"{where}: position (epoch {epoch}, step_in_epoch {step}, global_step {global_step}) does not fit "
                f"this run's {steps_per_epoch} steps per epoch (corrupt, or the training set or batch_size changed)"
            )
        steps_asked = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps,
                                                                                    cfg.epochs * steps_per_epoch)
        if global_step > steps_asked:
            raise ckpt_mod.CheckpointError(
                f"{where}: the run has trained {global_step} steps, more than the {steps_asked} this run asks for "
                f"(epochs {cfg.epochs}, max_steps {cfg.max_steps}, {steps_per_epoch} steps per epoch); a resumed run "
                "cannot train fewer steps: train the new settings as a new run (another folder, or overwrite)"
            )
        if len(ck.state["history"]) != epoch:
            raise ckpt_mod.CheckpointError(
                f"{where}: the history holds {len(ck.state['history'])} epochs, the position says {epoch}"
            )
        if (step > 0) != (saved["weight_sum"] > 0) or (step == 0 and saved["loss_sum"] != 0):
            raise ckpt_mod.CheckpointError(
                f"{where}: running loss sums (loss_sum {saved['loss_sum']}, weight_sum {saved['weight_sum']}) "
                f"do not fit step_in_epoch {step}"
            )
        ckpt_mod.load_optimizer_state(optimizer, ck)
        position.update(saved)
        self.history = list(ck.state["history"])
        if self.dist.is_main:
            ckpt_mod.remove_stale_files(self.out_dir)
        else:
            # The saved running sums are global; count them once.
            position["loss_sum"], position["weight_sum"], position["samples"] = 0.0, 0.0, 0
        return ck.tensors, ck.state["rng"]

    def _start(self) -> None:
        """Write a new run's ``config.json`` and the task's artifacts (main process)."""
        if self.out_dir is None or not self.dist.is_main:
            return
        task = self.task
        atomic_write_json(
            self.out_dir / "config.json",
            {"model_type": task.model_type, "model_config": task.model_config,
             "train_config": self.config.to_dict(), **self.extra},
        )
        # Files the task needs at inference (e.g. a tokenizer) go beside the checkpoint,
        # so that a finished run folder is self-contained.
        save_artifacts = getattr(task, "save_artifacts", None)
        if callable(save_artifacts):
            save_artifacts(self.out_dir)

    # ------------------------------------------------------------------ main loop

    def fit(self) -> dict[str, Any]:
        """Train (or continue training); return the final metrics and a summary.

        Returns a dict with ``metrics`` (the evaluation of the final model), ``train_loss``
        (the mean training loss of the last epoch, or of the part of it trained), ``history``
        (one record per finished epoch), ``params``, ``train_time_s``, ``samples_per_s``,
        ``global_step`` and ``stopped`` (True when ``max_steps`` ended the run before its last
        epoch). Under DistributedDataParallel every process returns the same result, the main
        process's (which evaluates and holds the global loss sums); so is every process's ``history``.

        ``max_steps`` ends the run after that many optimiser steps in all. When that is inside
        an epoch, the model of that step is checkpointed (whatever ``checkpoint_every``) and
        evaluated for ``metrics``; the history keeps whole epochs only, and a resumed run
        carries on from that step.
        """
        cfg, task, dist = self.config, self.task, self.dist
        self._prepare_out_dir()
        train_ds, eval_ds, model, optimizer = self._build()
        n_train = len(train_ds)
        if n_train < dist.world_size:
            raise ValueError(f"the training set has {n_train} samples, fewer than {dist.world_size} processes")
        steps_per_epoch = len(global_batches(n_train, cfg.batch_size, cfg.seed, 0, dist.world_size))
        total_steps = steps_per_epoch * cfg.epochs
        rng_to_restore = None
        position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "weight_sum": 0.0,
                    "train_time_s": 0.0, "samples": 0, "seed": cfg.seed}
        if self.resume:
            rng_to_restore = self._resume(model, optimizer, position, steps_per_epoch)
        else:
            self._start()

        train_model: nn.Module = model
        if dist.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        eval_loader = _batch_loader(eval_ds, task.collate, eval_batch_keys(len(eval_ds), cfg.eval_batch_size, cfg.seed),
                                    cfg.num_workers)
        writer = self._tensorboard()
        if rng_to_restore is not None and position["step_in_epoch"] == 0:
            # Restored last, right before the loop, so nothing above can disturb it.
            ckpt_mod.set_rng_state(*rng_to_restore)
            rng_to_restore = None
        stopped = False
        final_eval: dict[str, float] | None = None
        while position["epoch"] < cfg.epochs:
            if self._max_steps_reached(position):
                stopped = True
                if position["step_in_epoch"]:
                    # Resumed at the step a max_steps stop checkpointed: report that model, as the stop did.
                    final_eval = self._evaluate(model, eval_loader) if dist.is_main else {}
                break
            epoch = position["epoch"]
            batches = global_batches(n_train, cfg.batch_size, cfg.seed, epoch, dist.world_size)
            keys = train_batch_keys(batches, n_train, cfg.seed, epoch, dist.rank, dist.world_size,
                                    position["step_in_epoch"])
            batches = batches[position["step_in_epoch"] :]
            loader = _batch_loader(train_ds, task.collate, keys, cfg.num_workers)
            bar = None
            if self.progress and dist.is_main:
                bar = EpochProgress(epoch + 1, cfg.epochs, steps_per_epoch, done=position["step_in_epoch"],
                                    run_steps_left=total_steps - position["global_step"])
            model.train()
            t0 = time.perf_counter()
            # Starting an epoch's loader draws its base seed from the global RNG. A checkpoint
            # inside an epoch holds the RNG after that draw, so it is restored after the start.
            batch_iter = iter(loader)
            if rng_to_restore is not None:
                ckpt_mod.set_rng_state(*rng_to_restore)
                rng_to_restore = None
            stand_ins = [is_stand_in(b, dist.rank) for b in batches]
            for batch, stand_in in zip(batch_iter, stand_ins, strict=True):
                lr = lr_at(cfg, position["global_step"], total_steps, steps_per_epoch)
                loss = self._train_step(train_model, optimizer, batch, lr, position, stand_in)
                if bar is not None:
                    bar.update(loss.detach(), lr)
                if cfg.checkpoint_every and position["global_step"] % cfg.checkpoint_every == 0 \
                        and position["step_in_epoch"] < steps_per_epoch:
                    position["train_time_s"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self._reduce_running(position)
                    self._save(model, optimizer, position)
                if self._max_steps_reached(position) and position["step_in_epoch"] < steps_per_epoch:
                    stopped = True
                    break
            position["train_time_s"] += time.perf_counter() - t0
            if bar is not None:
                bar.close()
            if stopped:
                final_eval = self._stop_mid_epoch(model, optimizer, eval_loader, position)
                break
            self._end_epoch(model, optimizer, eval_loader, position, writer)
        if writer is not None:
            writer.close()
        last = self.history[-1] if self.history else {}
        if final_eval is not None:
            metrics = final_eval
            train_loss = _mean_train_loss(position)
        else:
            metrics = {k[len("eval_") :]: v for k, v in last.items() if k.startswith("eval_")}
            train_loss = last.get("train_loss")
        # The main process holds the global sums and the evaluation; every process returns its result.
        return broadcast_object({
            "metrics": metrics,
            "train_loss": train_loss,
            "history": list(self.history),
            "params": count_parameters(model),
            "train_time_s": position["train_time_s"],
            "samples_per_s": position["samples"] / max(position["train_time_s"], 1e-9),
            "global_step": position["global_step"],
            "stopped": stopped,
        })

    def _build(self) -> tuple[Any, Any, nn.Module, torch.optim.Optimizer]:
        """The datasets, the model (on the device; also ``self.model``) and its AdamW optimiser."""
        import random

        import numpy as np

        cfg = self.config
        # Datasets first: building them may draw random numbers (synthetic tasks, splits),
        # and the model's initialisation must not depend on how many.
        torch.manual_seed(cfg.seed)
        train_ds, eval_ds = self.task.datasets()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = self.task.build_model().to(self.device)
        self.model = model
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                # Biases, norms and scalar parameters (alpha, bandwidth) are not decayed.
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        return train_ds, eval_ds, model, optimizer

    def _train_step(self, train_model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, lr: float,
                    position: dict[str, Any], stand_in: bool = False) -> torch.Tensor:
        """One optimiser step on ``batch`` at learning rate ``lr``; advance ``position``; return the loss.
        A ``stand_in`` batch (this process has no share of the global batch) has weight 0: it takes
        part in the step, adding nothing to the gradient or the loss sums."""
        cfg, dist = self.config, self.dist
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = to_device(batch, self.device)
        loss, weight = self.task.loss(train_model, batch)
        weight = 0.0 if stand_in else float(weight)
        total_weight = all_reduce_sum(weight, self.device) if dist.enabled else weight
        if total_weight <= 0:
            raise ValueError("a training batch has zero loss weight (no samples or no target tokens)")
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {position['global_step']} "
                f"(epoch {position['epoch'] + 1}); try a lower lr or grad_clip"
            )
        # DDP averages gradients over processes; scaling by weight * world / total makes
        # that average the gradient of the mean loss over the whole global batch.
        objective = loss * (weight * dist.world_size / total_weight)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        optimizer.step()
        position["loss_sum"] += float(loss.detach()) * weight
        position["weight_sum"] += weight
        position["samples"] += 0 if stand_in else _batch_len(batch)
        position["global_step"] += 1
        position["step_in_epoch"] += 1
        return loss

    def _end_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, eval_loader: Any,
                   position: dict[str, Any], writer: Any) -> None:
        """Evaluate, record the epoch in the history and the logs, checkpoint, call ``on_epoch_end``."""
        dist = self.dist
        epoch = position["epoch"]
        self._reduce_running(position)
        record = {"epoch": epoch + 1, "step": position["global_step"],
                  "lr": optimizer.param_groups[0]["lr"],
                  "train_loss": _mean_train_loss(position)}
        if dist.is_main:
            record.update({f"eval_{k}": v for k, v in self._evaluate(model, eval_loader).items()})
        record["train_time_s"] = position["train_time_s"]
        record["samples_per_s"] = position["samples"] / max(position["train_time_s"], 1e-9)
        record = broadcast_object(record)  # the main process's: it holds the global sums and the evaluation
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

    def _max_steps_reached(self, position: dict[str, Any]) -> bool:
        return self.config.max_steps is not None and position["global_step"] >= self.config.max_steps

    def _stop_mid_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, eval_loader: Any,
                        position: dict[str, Any]) -> dict[str, float]:
        """``max_steps`` ended the run inside an epoch: checkpoint the model at this step, then
        evaluate that same model (on the main process; ``{}`` elsewhere, and :meth:`fit` gives every
        process the main one's result). The checkpoint comes first: it holds the RNG state an
        uninterrupted run would go on with, which evaluating may draw from."""
        self._reduce_running(position)
        self._save(model, optimizer, position)
        return self._evaluate(model, eval_loader) if self.dist.is_main else {}

    def _evaluate(self, model: nn.Module, eval_loader: Any) -> dict[str, float]:
        """The task's metrics of ``model`` (in eval mode) on the evaluation set."""
        model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(model, _DeviceLoader(eval_loader, self.device))
        return {k: float(v) for k, v in metrics.items()}

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


__all__ = ["RESUME_NEUTRAL", "RUN_FILES", "SCHEDULES", "RunFolderError", "TrainConfig", "Trainer", "changed_settings",
           "existing_run_files", "lr_at", "resume_changes"]
