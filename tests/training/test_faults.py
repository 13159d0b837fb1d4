"""Fault injection for runs: SIGKILL at random moments of training and inside checkpoint
writes, corrupt or missing files of every kind a run folder holds, read-only folders.

After every fault the run either resumes exactly (its final weights and metrics identical
to those of an uninterrupted run with the same seed) or stops with an error naming a file
and changes nothing; a committed checkpoint is never lost or replaced by an older one, and
no run starts over while it has a checkpoint. The test counts the faults and the outcomes
and asserts zero lost runs and zero silent restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_worker import CONFIG
from test_run_folder import rewrite_checkpoint, snapshot
from toy import ToyTask

import levyattn
from levyattn.training import checkpoint as ck
from levyattn.training.trainer import TrainConfig, Trainer

WORKER = Path(__file__).with_name("fault_worker.py")
SRC = Path(levyattn.__file__).resolve().parents[1]


class Worker:
    """fault_worker.py, running launches one after another (see there)."""

    def __init__(self, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(WORKER.parent)])}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), env=env)
        self.buffer = b""

    def _line(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"the fault worker stopped answering; its stderr:\n{self.log.read_text()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def run(self, out: Path, *fault: str, kill_after: float | None = None) -> tuple[int, list[str], float]:
        """Launch a training into ``out``; return (exit code, its output lines, seconds it trained)."""
        self.proc.stdin.write((" ".join([str(out), *fault]) + "\n").encode())
        self.proc.stdin.flush()
        first = self._line()
        assert first.startswith("ready "), (first, self.log.read_text())
        t0 = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(first.split()[1]), signal.SIGKILL)
        lines = []
        while not (line := self._line()).startswith("exit "):
            lines.append(line)
        return int(line.split()[1]), lines, time.perf_counter() - t0

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def committed(out: Path) -> tuple[int, int] | None:
    """(epoch, global_step) of the checkpoint in ``out``, None when it has none that loads."""
    try:
        position = ck.load_checkpoint(out).state["position"]
    except (FileNotFoundError, ck.CheckpointError):
        return None
    return position["epoch"], position["global_step"]


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The finished run's weights and the metrics log, the fields that do not depend on the clock."""
    weights = ck.load_checkpoint(out).model_state_dict()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clock = ("train_time_s", "samples_per_s")
    return weights, [{k: v for k, v in r.items() if k not in clock} for r in rows]


def same_run(a, b) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.slow
def test_runs_survive_kills_corruption_and_read_only_folders(tmp_path, read_only, capsys):
    rng = random.Random(20240531)
    counts = {"faults": 0, "exact resumes": 0, "named errors": 0, "lost runs": 0, "silent restarts": 0,
              "inexact resumes": 0}
    worker = Worker(tmp_path / "worker.log")
    try:
        # The uninterrupted run every outcome is compared with, and how long its training takes.
        code, _, training_s = worker.run(tmp_path / "reference")
        assert code == 0, (tmp_path / "worker.log").read_text()
        reference = final_state(tmp_path / "reference")
        # -- SIGKILL at random moments and inside the K-th atomic write, in three phases; each
        # chain kills one run again and again, then lets it finish --------------------------------
        kinds = ["random", "mid-write", "before-replace", "after-replace"]
        total_kills = 0
        for chain in range(3):
            run = tmp_path / f"killed-{chain}"
            kills = refused = 0
            for kind in rng.sample(kinds * 2, 8):
                before = committed(run)
                if kind == "random":
                    code, lines, _ = worker.run(run, kill_after=rng.uniform(0.0, training_s / 4))
                else:
                    # about 2 writes a step (tensors, checkpoint.json), 4 at an epoch end (+ metrics)
                    code, lines, _ = worker.run(run, kind, str(rng.randrange(0, 16)))
                if code != -signal.SIGKILL:  # the run ended before the fault struck, or was refused
                    assert code in (0, 2), (code, lines)
                    if code == 2:  # killed inside its first save: a tensors file, no checkpoint.json
                        assert "checkpoint.json not found" in lines[-1], lines
                        refused += 1
                        shutil.rmtree(run)  # what a user does after reading the error
                    continue
                kills += 1
                after = committed(run)
                # A committed checkpoint is never lost, nor replaced by an older one.
                if before is not None and (after is None or after < before):
                    counts["lost runs"] += 1
                # A launch that resumed a checkpoint never logs an epoch the checkpoint already holds.
                epochs = [json.loads(line)["epoch"] for line in lines if line.startswith("{")]
                if before is not None and epochs and epochs[0] <= before[0]:
                    counts["silent restarts"] += 1
            # Finish the run: it resumes (or, killed before its first checkpoint, starts over).
            code, lines, _ = worker.run(run)
            if code == 2:
                assert "checkpoint.json not found" in lines[-1], lines
                refused += 1
                shutil.rmtree(run)
                code, lines, _ = worker.run(run)
            assert code == 0, (tmp_path / "worker.log").read_text()
            assert not list(run.glob(".*.tmp")), "the temporary files of killed saves are removed"
            assert [p.name for p in run.glob("ckpt-*")] == [ck.load_checkpoint(run).state["tensors_file"]]
            counts["faults"] += kills
            counts["named errors"] += refused
            if same_run(final_state(run), reference):
                counts["exact resumes"] += kills - refused
            else:
                counts["inexact resumes"] += 1
            total_kills += kills
    finally:
        worker.close()

    # -- corrupt or missing files, read-only folders (in-process: nothing to kill) ----------------
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker's launches, so that the sums agree to the last bit
    try:
        _corrupt_and_read_only(tmp_path, read_only, reference, counts)
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print(f"\nfault injection: {counts}")
    assert total_kills >= 16, f"only {total_kills} of 24 kills struck before their run ended"
    assert counts["lost runs"] == counts["silent restarts"] == counts["inexact resumes"] == 0, counts
    assert counts["exact resumes"] + counts["named errors"] == counts["faults"], counts


def _corrupt_and_read_only(tmp_path: Path, read_only, reference, counts: dict[str, int]) -> None:
    """Resume copies of a run stopped mid-epoch, each with one file corrupted or missing, and
    runs in read-only folders; count the outcomes into ``counts``."""
    cfg = TrainConfig(**{**CONFIG, "checkpoint_every": 0})  # saving draws no random numbers: same results
    base = tmp_path / "base"
    Trainer(ToyTask(), TrainConfig(**{**CONFIG, "max_steps": 13}), base).fit()  # stops in epoch 2, at a checkpoint
    tensors = ck.load_checkpoint(base).state["tensors_file"]

    def flip_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    corruptions = {
        "checkpoint.json deleted": lambda d: (d / "checkpoint.json").unlink(),
        "checkpoint.json truncated": lambda d: (d / "checkpoint.json").write_text(
            (d / "checkpoint.json").read_text()[:100]),
        "checkpoint.json garbage": lambda d: (d / "checkpoint.json").write_bytes(bytes(range(256))),
        "config.json deleted": lambda d: (d / "config.json").unlink(),
        "config.json garbage": lambda d: (d / "config.json").write_text("{not json"),
        "weights deleted": lambda d: (d / tensors).unlink(),
        "weights bit flip": lambda d: flip_byte(d / tensors),
        "weights truncated": lambda d: (d / tensors).write_bytes((d / tensors).read_bytes()[:1000]),
        "weights NaN": lambda d: rewrite_checkpoint(
            d, edit_tensors=lambda t: t["model.net.3.weight"].fill_(float("nan"))),
        "optimizer state dropped": lambda d: rewrite_checkpoint(d, edit_state=lambda s: s.pop("optimizer")),
        "optimizer tensor dropped": lambda d: rewrite_checkpoint(
            d, edit_tensors=lambda t: t.pop("optim.1.exp_avg_sq")),
        "rng dropped": lambda d: rewrite_checkpoint(d, edit_state=lambda s: s.pop("rng")),
        "position corrupt": lambda d: rewrite_checkpoint(
            d, edit_state=lambda s: s["position"].update(step_in_epoch=77)),
        "metrics.jsonl deleted": lambda d: (d / "metrics.jsonl").unlink(),
        "metrics.jsonl garbage": lambda d: (d / "metrics.jsonl").write_text("not json\n"),
        "metrics.csv deleted": lambda d: (d / "metrics.csv").unlink(),
        "stale tensors file": lambda d: (d / "ckpt-00000014.safetensors").write_bytes(b"a killed save"),
        "stale temporary file": lambda d: (d / ".checkpoint.json.abcd.tmp").write_text("{"),
    }
    for name, corrupt in corruptions.items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(base, run)
        corrupt(run)
        counts["faults"] += 1
        before = snapshot(run)
        trainer = Trainer(ToyTask(), cfg, run, resume=True)
        try:
            trainer.fit()
        except (ValueError, FileNotFoundError) as err:
            assert str(run) in str(err), (name, err)
            assert snapshot(run) == before, f"{name}: a refused resume changed the run folder"
            counts["named errors"] += 1
            continue
        if same_run(final_state(run), reference):
            counts["exact resumes"] += 1
        else:
            counts["inexact resumes"] += 1

    for name, resume in (("read-only new run", False), ("read-only resume", True)):
        run = tmp_path / name.replace(" ", "-")
        if resume:
            shutil.copytree(base, run)
        read_only(run)
        counts["faults"] += 1
        before = snapshot(run)
        with pytest.raises(PermissionError, match=re.escape(f"{run} is not writable")):
            Trainer(ToyTask(), cfg, run, resume=resume).fit()
        assert snapshot(run) == before
        counts["named errors"] += 1
