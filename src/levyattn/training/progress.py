"""Training progress that is seen wherever the output goes.

On a terminal, a tqdm bar per epoch. Elsewhere (a pipe, a log file, a batch job), where redrawn
bars would be noise, a plain line on the ``levyattn`` logger every :data:`EVERY_S` seconds, e.g.
``epoch 2/12: step 40/94, loss 1.2345, lr 3.00e-03, 2.1 steps/s, training ETA 4m05s``; the CLI
shows these on stderr. The library itself never prints.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

EVERY_S = 30.0  # seconds between plain progress lines
_log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class EpochProgress:
    """Progress of one epoch of ``steps`` optimizer steps, ``done`` of them already (a resumed
    epoch); ``run_steps_left`` counts the steps left in the whole run, for the ETA. ``unit`` names
    what is counted ("epoch"; a layer or a stage for other work)."""

    def __init__(
        self, epoch: int, epochs: int, steps: int, *, done: int = 0, run_steps_left: int = 0, unit: str = "epoch"
    ) -> None:
        self.epoch, self.epochs, self.steps, self.step = epoch, epochs, steps, done
        self.unit = unit
        self.run_steps_left = run_steps_left
        self.started = self.last_line = time.perf_counter()
        # Steps timed for the rate: from the end of this epoch's first step, which can hold one-time
        # costs (the CPU kernel's build, the data loader's start) that would skew the rate and the ETA.
        self.timed_steps = -1
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, initial=done, desc=f"{unit} {epoch}/{epochs}", leave=False, dynamic_ncols=True)

    def update(self, loss: Any, lr: float) -> None:
        """One step done; ``loss`` is a number or a 0-dim tensor (read only when shown)."""
        self.step += 1
        self.timed_steps += 1
        self.run_steps_left -= 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}")
            return
        now = time.perf_counter()
        if self.timed_steps == 0:
            self.started = now
        if self.timed_steps == 0 or now - self.last_line < EVERY_S:
            return
        self.last_line = now
        rate = self.timed_steps / max(now - self.started, 1e-9)
        _log.info(
            "%s %d/%d: step %d/%d, loss %.4f, lr %.2e, %.1f steps/s, training ETA %s",
            self.unit, self.epoch, self.epochs, self.step, self.steps, float(loss), lr, rate,
            _duration(max(self.run_steps_left, 0) / rate),
        )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
