"""Progress off a terminal: plain lines every EVERY_S seconds, from the library's logger; the CLI shows them."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import levyattn.training.progress as progress

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = ["--set", "limit_train=64", "--set", "limit_test=32", "--set", "d_model=8", "--set", "batch_size=16"]


def test_off_a_terminal_a_plain_line_every_interval(monkeypatch, caplog):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    bar = progress.EpochProgress(2, 3, 4, done=1, run_steps_left=7)
    assert bar.bar is None  # pytest's captured stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="levyattn"):
        bar.update(1.0, 1e-3)  # the first step is not timed: it may hold one-time costs such as the kernel build
        bar.update(0.5, 1e-3)
        bar.update(0.25, 2e-3)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert re.fullmatch(r"epoch 2/3: step 3/4, loss 0\.5000, lr 1\.00e-03, [\d.]+ steps/s, training ETA \dm\d\ds",
                        lines[0]), lines[0]
    assert lines[1].startswith("epoch 2/3: step 4/4, loss 0.2500, lr 2.00e-03, ")


def test_lines_wait_for_the_interval(monkeypatch, caplog):
    monkeypatch.setattr(progress, "EVERY_S", 3600.0)
    bar = progress.EpochProgress(1, 1, 10)
    with caplog.at_level(logging.INFO, logger="levyattn"):
        for _ in range(10):
            bar.update(1.0, 1e-3)
    assert caplog.records == []


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["train", "--preset", "digits-vit", "--set", "epochs=1", *TINY],
    ["sweep", "--preset", "digits-vit", "--alphas", "1.2", "--attention", "softmax", "--seeds", "0",
     "--set", "epochs=1", "--gap-samples", "4", *TINY],
])
def test_piped_train_and_sweep_print_progress_lines(tmp_path, command):
    code = ("import sys; import levyattn.training.progress as p; p.EVERY_S = 0.0\n"
            "from levyattn.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", code, *command, "--out", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("levyattn: epoch 1/1: step ")]
    assert len(lines) == 3, result.stderr  # 64 samples in batches of 16, the first step untimed
    assert "\r" not in result.stderr  # no redrawn bars


def test_the_first_steps_one_time_cost_does_not_enter_the_rate(monkeypatch, caplog):
    clock = iter([0.0, 100.0, 101.0, 102.0])  # the first step took 100 s (the kernel's build), the others 1 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    bar = progress.EpochProgress(1, 1, 10, run_steps_left=10)
    with caplog.at_level(logging.INFO, logger="levyattn"):
        for _ in range(3):
            bar.update(1.0, 1e-3)
    assert [r.getMessage().split(", ", 3)[3] for r in caplog.records] == [
        "1.0 steps/s, training ETA 0m08s", "1.0 steps/s, training ETA 0m07s"]
