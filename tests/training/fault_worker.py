"""Launches of a small training run, for the fault-injection test (test_faults.py).

``python fault_worker.py`` imports torch once, then for every line ``OUT [WRITE_FAULT K]``
read from stdin forks a process that trains the toy task into OUT, and prints ``exit
CODE`` when that process has ended (``-9``: killed by SIGKILL). Forking makes a launch
cost milliseconds instead of an interpreter start; nothing here runs a torch operation
before forking, and each launch uses one thread.

A launch does what a user or a sweep does: resume when OUT has a checkpoint, start over
when OUT holds only the ``config.json`` of a run killed before its first checkpoint, else
start (the trainer refuses a folder with anything more). It prints ``ready PID`` before
training, one JSON line per finished epoch, and ``done``; a refused start prints
``error: <message>`` and exits with 2.

``WRITE_FAULT`` kills the launch with SIGKILL inside its K-th atomic write (0-based):
``mid-write`` (half the bytes in the temporary file), ``before-replace`` (the temporary
file complete, not yet renamed) or ``after-replace`` (renamed, the next file not begun).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from toy import ToyTask

import levyattn.io
from levyattn.training.trainer import TrainConfig, Trainer, existing_run_files

# 60 samples / 8 = 8 steps per epoch, 32 steps, a checkpoint after every step.
CONFIG = dict(epochs=4, batch_size=8, eval_batch_size=16, lr=3e-2, seed=0, warmup_steps=2, checkpoint_every=1)


def install_write_fault(fault: str, k: int) -> None:
    real = levyattn.io.atomic_write
    calls = [0]

    def atomic_write(path, write):
        n, calls[0] = calls[0], calls[0] + 1
        if n != k:
            return real(path, write)
        path = Path(path)
        if fault == "after-replace":
            real(path, write)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=levyattn.io.TMP_SUFFIX, dir=path.parent)
            os.close(fd)
            write(tmp)
            if fault == "mid-write":
                data = Path(tmp).read_bytes()
                Path(tmp).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    levyattn.io.atomic_write = atomic_write


def launch(out: str, fault: str | None = None, k: str | None = None) -> int:
    out_dir = Path(out)
    if fault is not None:
        install_write_fault(fault, int(k))
    files = existing_run_files(out_dir)
    resume = "checkpoint.json" in files
    overwrite = files == ["config.json"]
    print(f"ready {os.getpid()}", flush=True)
    try:
        Trainer(ToyTask(), TrainConfig(**CONFIG), out_dir, resume=resume, overwrite=overwrite,
                on_epoch_end=lambda record: print(json.dumps(record), flush=True)).fit()
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", flush=True)
        return 2
    print("done", flush=True)
    return 0


def serve() -> None:
    torch.set_num_threads(1)
    while line := sys.stdin.readline():
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                code = launch(*line.split())
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    serve()
