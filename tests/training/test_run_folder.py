"""Run folders: a run is never restarted or overwritten silently, every checkpoint field is
checked before use, a read-only folder fails before training, and what killed saves leave
behind is cleaned up (toy task, CPU, seconds)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy import ToyTask

from levyattn.cli import main
from levyattn.training import checkpoint as ck
from levyattn.training.trainer import RunFolderError, TrainConfig, Trainer


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, eval_batch_size=16, lr=3e-2, seed=0, checkpoint_every=3)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(folder: Path) -> dict[str, str]:
    """name -> SHA-256 of every file below ``folder``: what "nothing was changed" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_checkpoint(folder: Path, edit_state=None, edit_tensors=None) -> None:
    """Change a saved checkpoint in place and keep its SHA-256 consistent, as a corrupting
    tool (or a bug) that writes valid files with wrong content would."""
    state = json.loads((folder / "checkpoint.json").read_text())
    if edit_tensors is not None:
        tensors_path = folder / state["tensors_file"]
        tensors = load_file(tensors_path)
        edit_tensors(tensors)
        save_file(tensors, tensors_path)
        state["tensors_sha256"] = hashlib.sha256(tensors_path.read_bytes()).hexdigest()
    if edit_state is not None:
        edit_state(state)
    (folder / "checkpoint.json").write_text(json.dumps(state))


class CountingToyTask(ToyTask):
    """Counts dataset builds: a run folder that fails its checks must fail before them."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.builds = 0

    def datasets(self):
        self.builds += 1
        return super().datasets()


# ----------------------------------------------------------------------------- resume / overwrite


def test_resume_without_checkpoint_json_changes_nothing(tmp_path):
    Trainer(ToyTask(), _cfg(), tmp_path).fit()
    (tmp_path / "checkpoint.json").unlink()
    before = snapshot(tmp_path)
    task = CountingToyTask()
    with pytest.raises(FileNotFoundError, match=r"cannot resume .*checkpoint\.json not found .*config\.json"):
        Trainer(task, _cfg(), tmp_path, resume=True).fit()
    assert snapshot(tmp_path) == before and task.builds == 0
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Trainer(ToyTask(), _cfg(), tmp_path / "never", resume=True).fit()
    assert not (tmp_path / "never").exists()


def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path):
    first = Trainer(ToyTask(), _cfg(), tmp_path).fit()
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError, match=r"already holds a run \(checkpoint\.json.*--resume.*--overwrite"):
        Trainer(ToyTask(), _cfg(seed=1), tmp_path).fit()
    assert snapshot(tmp_path) == before
    # overwrite=True replaces it: the old run's files are gone, the new run's are there
    (tmp_path / "ckpt-99999999.safetensors").write_bytes(b"from the old run")
    second = Trainer(ToyTask(), _cfg(seed=1, epochs=1), tmp_path, overwrite=True).fit()
    assert second["history"] != first["history"][:1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "ckpt-99999999.safetensors").exists()
    with pytest.raises(ValueError, match="contradict"):
        Trainer(ToyTask(), _cfg(), tmp_path, resume=True, overwrite=True)


def test_cli_refuses_to_overwrite_and_to_restart(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "digits-vit", "--out", str(out), "--no-progress", "--set", "epochs=1",
            "--set", "limit_train=32", "--set", "limit_test=16", "--set", "d_model=8", "--set", "batch_size=16"]
    assert main(args) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {out}" in err and "--overwrite" in err
    assert snapshot(out) == before
    (out / "checkpoint.json").unlink()
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert "checkpoint.json not found" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main([*args, "--overwrite"]) == 0
    assert (out / "checkpoint.json").is_file()
    # a checkpoint that cannot be used is named, with what can be done (the message said only what was wrong)
    capsys.readouterr()
    tensors = next(out.glob("ckpt-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{tensors} is corrupt" in err and f"--out {out} --overwrite" in err and "restore" in err
    state = (out / "checkpoint.json").read_text()
    (out / "checkpoint.json").write_text(state[: len(state) // 2])
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.json'} is not valid JSON" in err and f"--out {out} --overwrite" in err


# ----------------------------------------------------------------------------- checkpoint fields


def _del(*path):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]

    return edit


def _set(value, *path):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return edit


STATE_FAULTS = {
    "no optimizer": (_del("optimizer"), "'optimizer'"),
    "no rng": (_del("rng"), "'rng'"),
    "no position": (_del("position"), "'position'"),
    "no history": (_del("history"), "'history'"),
    "no epoch": (_del("position", "epoch"), "'epoch'"),
    "no step_in_epoch": (_del("position", "step_in_epoch"), "'step_in_epoch'"),
    "no global_step": (_del("position", "global_step"), "'global_step'"),
    "no loss_sum": (_del("position", "loss_sum"), "'loss_sum'"),
    "no seed": (_del("position", "seed"), "'seed'"),
    "no param_groups": (_del("optimizer", "param_groups"), "param_groups"),
    "no model_config": (_del("model_config"), "'model_config'"),
    "step past the epoch": (_set(99, "position", "step_in_epoch"), "step_in_epoch 99"),
    "negative step": (_set(-1, "position", "step_in_epoch"), "'step_in_epoch'"),
    "step as text": (_set("3", "position", "step_in_epoch"), "'step_in_epoch'"),
    "global step off": (_set(5, "position", "global_step"), "global_step 5"),
    "NaN loss sum": (_set(math.nan, "position", "loss_sum"), "'loss_sum'"),
    "other seed": (_set(7, "position", "seed"), "seed 7"),
    "history too long": (_set([{"epoch": 1}], "history"), "history holds 1 epochs"),
    "history not a list": (_set({}, "history"), "'history'"),
    "rng garbage": (_set({"python": [3, [1, 2], None], "numpy": []}, "rng"), "'rng'"),
    "tensors file elsewhere": (_set("../ckpt-00000003.safetensors", "tensors_file"), "tensors_file"),
    "param groups of another optimiser": (_set([], "optimizer", "param_groups"), "optimiser state"),
}


@pytest.mark.parametrize("fault", sorted(STATE_FAULTS))
def test_every_checkpoint_field_is_checked(tmp_path, fault):
    # 60 samples / 8 = 8 steps per epoch; max_steps checkpoints step 4 of epoch 1
    Trainer(ToyTask(), _cfg(max_steps=4), tmp_path).fit()
    assert ck.load_checkpoint(tmp_path).state["position"]["step_in_epoch"] == 4
    edit, named = STATE_FAULTS[fault]
    rewrite_checkpoint(tmp_path, edit_state=edit)
    before = snapshot(tmp_path)
    with pytest.raises(ck.CheckpointError) as err:
        Trainer(ToyTask(), _cfg(), tmp_path, resume=True).fit()
    assert named in str(err.value) and "checkpoint" in str(err.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fault", ["nan weight", "inf optimiser state", "no rng tensor", "no optimiser tensor"])
def test_bad_tensors_are_named(tmp_path, fault):
    Trainer(ToyTask(), _cfg(max_steps=4), tmp_path).fit()

    def edit(tensors):
        if fault == "nan weight":
            tensors["model.net.0.weight"][0, 0] = math.nan
        elif fault == "inf optimiser state":
            tensors["optim.0.exp_avg"][0, 0] = math.inf
        elif fault == "no rng tensor":
            del tensors["rng.torch_cpu"]
        else:
            del tensors["optim.0.exp_avg"]

    rewrite_checkpoint(tmp_path, edit_tensors=edit)
    named = {"nan weight": "'model.net.0.weight' holds NaN", "inf optimiser state": "'optim.0.exp_avg' holds NaN",
             "no rng tensor": "'rng.torch_cpu'", "no optimiser tensor": "optimiser state"}[fault]
    with pytest.raises(ck.CheckpointError, match=named):
        Trainer(ToyTask(), _cfg(), tmp_path, resume=True).fit()


# ----------------------------------------------------------------------------- folder


def test_read_only_folder_fails_before_training(tmp_path, read_only):
    task = CountingToyTask()
    with pytest.raises(PermissionError, match="run folder .*ro is not writable"):
        Trainer(task, _cfg(), read_only(tmp_path / "ro")).fit()
    assert task.builds == 0
    Trainer(ToyTask(), _cfg(max_steps=4), tmp_path / "run").fit()
    read_only(tmp_path / "run")
    with pytest.raises(PermissionError, match="not writable"):
        Trainer(task, _cfg(), tmp_path / "run", resume=True).fit()
    assert task.builds == 0


def test_leftovers_of_killed_saves_are_removed(tmp_path):
    Trainer(ToyTask(), _cfg(max_steps=4), tmp_path).fit()
    named = ck.load_checkpoint(tmp_path).state["tensors_file"]
    # a save killed after its tensors file, and one killed while writing checkpoint.json
    (tmp_path / "ckpt-00000006.safetensors").write_bytes(b"newer tensors, never committed")
    (tmp_path / ".checkpoint.json.x1y2.tmp").write_text('{"half')
    Trainer(ToyTask(), _cfg(), tmp_path, resume=True).fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".tmp")]
    assert [n for n in names if n.endswith(".safetensors")] == [ck.load_checkpoint(tmp_path).state["tensors_file"]]
    assert named not in names
    # without a readable checkpoint.json nothing is deleted: the tensors may be all that is left
    (tmp_path / "checkpoint.json").unlink()
    left = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert ck.remove_stale_files(tmp_path) == [] and sorted(p.name for p in tmp_path.glob("ckpt-*")) == left


def test_resume_extends_a_finished_run_exactly(tmp_path):
    """The checks leave the documented use alone: more epochs on a finished run."""
    full = Trainer(ToyTask(), _cfg(epochs=3, schedule="constant"), tmp_path / "full").fit()
    Trainer(ToyTask(), _cfg(epochs=2, schedule="constant"), tmp_path / "run").fit()
    resumed = Trainer(ToyTask(), _cfg(epochs=3, schedule="constant"), tmp_path / "run", resume=True).fit()
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    assert torch.equal(torch.tensor([r["eval_loss"] for r in resumed["history"]]),
                       torch.tensor([r["eval_loss"] for r in full["history"]]))


def test_sweep_restarts_only_a_run_without_a_checkpoint(tmp_path):
    from levyattn.training.presets import apply_overrides, get_preset
    from levyattn.training.sweep import run_sweep

    preset = apply_overrides(get_preset("digits-vit"),
                             ["epochs=1", "limit_train=32", "limit_test=16", "d_model=8", "batch_size=16"])

    def sweep(log=None, preset=preset):
        return run_sweep(preset, alphas=[1.2], attentions=["fna"], seeds=[0], out_dir=tmp_path, gap_samples=4,
                         log=log)

    first = sweep()
    run = tmp_path / "runs" / "fna-a1.2-s0"
    # killed before its first checkpoint: config.json alone, nothing to resume, so it starts over
    for p in run.iterdir():
        if p.name != "config.json" and p.is_file():
            p.unlink()
    logs: list[str] = []
    again = sweep(logs.append)
    assert any("starting over" in m for m in logs)
    assert again.runs[0]["accuracy"] == first.runs[0]["accuracy"]
    # interrupted (no result.json yet): its checkpoint must hold the settings the sweep asks for
    (run / "result.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint\.json was trained with other settings than this sweep asks for: "
                                         r"lr: 0\.003 -> 0\.5\. "):
        sweep(preset=apply_overrides(preset, ["lr=0.5"]))
    assert snapshot(tmp_path) == before
    # weights and metrics but no checkpoint.json: an error naming it, and nothing touched
    (run / "checkpoint.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.json not found"):
        sweep()
    assert snapshot(tmp_path) == before


def test_sweep_with_max_steps_inside_the_first_epoch(tmp_path):
    from levyattn.training.presets import apply_overrides, get_preset
    from levyattn.training.sweep import run_sweep

    # 64 samples / 16 = 4 steps an epoch; the run stops after 2, before any epoch has ended
    preset = apply_overrides(get_preset("digits-vit"), ["epochs=1", "limit_train=64", "limit_test=16", "d_model=8",
                                                         "batch_size=16", "max_steps=2"])
    first = run_sweep(preset, alphas=[1.2], attentions=["fna"], seeds=[0], out_dir=tmp_path, gap_samples=4)
    row = first.runs[0]
    assert ck.load_checkpoint(tmp_path / "runs" / "fna-a1.2-s0").state["position"]["global_step"] == 2
    assert 0 <= row["accuracy"] <= 1 and row["final_train_loss"] > 0
    again = run_sweep(preset, alphas=[1.2], attentions=["fna"], seeds=[0], out_dir=tmp_path, gap_samples=4)
    assert again.skipped == ["fna-a1.2-s0"] and again.runs[0]["final_train_loss"] == row["final_train_loss"]


def test_a_sweep_run_again_accepts_the_changes_a_resume_accepts(tmp_path):
    from levyattn.training.presets import apply_overrides, get_preset
    from levyattn.training.sweep import run_sweep

    # 64 samples / 16 = 4 steps an epoch, constant schedule (epochs may change on resume)
    preset = apply_overrides(get_preset("digits-vit"), ["epochs=2", "limit_train=64", "limit_test=16", "d_model=8",
                                                         "batch_size=16", "schedule=constant", "max_steps=2"])

    def sweep(*changes, out=tmp_path):
        return run_sweep(apply_overrides(preset, list(changes)), alphas=[1.2], attentions=["fna"], seeds=[0],
                         out_dir=out, gap_samples=4)

    first = sweep()
    run = tmp_path / "runs" / "fna-a1.2-s0"
    # settings that leave the training alone: the finished run is kept
    kept = sweep("eval_batch_size=8", "num_workers=1", "checkpoint_every=3")
    assert kept.skipped == ["fna-a1.2-s0"] and kept.runs[0]["final_train_loss"] == first.runs[0]["final_train_loss"]
    # a longer run: trained on from the checkpoint, to the result of a sweep that asked for it at once
    longer = sweep("max_steps=6")
    fresh = sweep("max_steps=6", out=tmp_path / "fresh")
    assert not longer.skipped and ck.load_checkpoint(run).state["position"]["global_step"] == 6
    for key in ("accuracy", "final_train_loss", "loss", "spectral_gap"):
        assert longer.runs[0][key] == fresh.runs[0][key], key
    assert json.loads((run / "result.json").read_text())["preset"]["train"]["max_steps"] == 6
    assert sweep("max_steps=6").skipped == ["fna-a1.2-s0"]
    # fewer steps than trained, or a setting a resume refuses: an error, and nothing changed
    before = snapshot(tmp_path)
    with pytest.raises(ck.CheckpointError, match="has trained 6 steps, more than the 2 this run asks for"):
        sweep()
    with pytest.raises(ValueError, match=r"result\.json was trained with other settings than this sweep asks for: "
                                         r"lr: 0\.003 -> 0\.5\. "):
        sweep("max_steps=6", "lr=0.5")
    assert snapshot(tmp_path) == before
    # an interrupted run (no result.json) resumes under such a change too
    (run / "result.json").unlink()
    resumed = sweep("max_steps=6", "eval_batch_size=8")
    assert resumed.runs[0]["final_train_loss"] == fresh.runs[0]["final_train_loss"]


# ----------------------------------------------------------------------------- changed settings


@pytest.mark.parametrize(("change", "named"), [
    (dict(weight_decay=0.9), "weight_decay: 0.0 -> 0.9"),
    (dict(lr=1e-2), "lr: 0.03 -> 0.01"),
    (dict(betas=(0.8, 0.99)), "betas: [0.9, 0.999] -> [0.8, 0.99]"),
    (dict(seed=1), "seed: 0 -> 1"),
    (dict(batch_size=4), "batch_size: 8 -> 4"),
    (dict(grad_clip=None), "grad_clip: 1.0 -> None"),
    (dict(schedule="cosine"), "schedule: 'constant' -> 'cosine'"),
    (dict(schedule="cosine", epochs=3, base=dict(schedule="cosine")), "epochs: 2 -> 3"),
])
def test_resume_refuses_changed_training_settings(tmp_path, change, named):
    change = dict(change)
    base = {"schedule": "constant", "weight_decay": 0.0, **change.pop("base", {})}
    Trainer(ToyTask(), _cfg(max_steps=4, **base), tmp_path).fit()
    before = snapshot(tmp_path)
    with pytest.raises(ck.CheckpointError, match=re.escape(named)):
        Trainer(ToyTask(), _cfg(**{**base, **change}), tmp_path, resume=True).fit()
    assert snapshot(tmp_path) == before


def test_resume_refuses_a_changed_model_config(tmp_path):
    Trainer(ToyTask(), _cfg(max_steps=4), tmp_path).fit()
    with pytest.raises(ck.CheckpointError, match=re.escape("model config dropout: 0.1 -> 0.2")):
        Trainer(ToyTask(dropout=0.2), _cfg(), tmp_path, resume=True).fit()


def test_resume_may_change_the_neutral_settings(tmp_path):
    """What RESUME_NEUTRAL allows leaves the run exactly as an uninterrupted one."""
    full = Trainer(ToyTask(), _cfg(schedule="step", epochs=3), tmp_path / "full").fit()
    Trainer(ToyTask(), _cfg(schedule="step", epochs=2, max_steps=11), tmp_path / "run").fit()
    resumed = Trainer(ToyTask(), _cfg(schedule="step", epochs=3, eval_batch_size=7, checkpoint_every=0,
                                      num_workers=0, device="cpu"), tmp_path / "run", resume=True).fit()
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    assert resumed["metrics"]["accuracy"] == full["metrics"]["accuracy"]


def test_train_preset_resume_refuses_changed_data_and_model_settings(tmp_path):
    from levyattn.training.presets import apply_overrides, get_preset, train_preset

    preset = apply_overrides(get_preset("digits-vit"), ["epochs=1", "limit_train=32", "limit_test=16", "d_model=8",
                                                       "batch_size=16", "max_steps=1"])
    train_preset(preset, tmp_path)
    before = snapshot(tmp_path)
    for change, named in (("limit_train=48", "data.limit_train: 32 -> 48"), ("alpha=1.6", "model.alpha: 1.2 -> 1.6"),
                          ("weight_decay=0.9", "weight_decay: 0.01 -> 0.9")):
        with pytest.raises(ck.CheckpointError, match=re.escape(named)):
            train_preset(apply_overrides(preset, [change, "max_steps=2"]), tmp_path, resume=True)
        assert snapshot(tmp_path) == before
    # where the data lies may change (digits are embedded: data_dir is not read), and max_steps
    result, _ = train_preset(apply_overrides(preset, ["data_dir=/elsewhere", "max_steps=2"]), tmp_path, resume=True)
    assert result["global_step"] == 2


def test_a_sweep_killed_inside_a_runs_first_checkpoint_says_what_to_delete(tmp_path, monkeypatch):
    # The tensors of the first checkpoint written, its checkpoint.json not: the sweep run again
    # stopped with the trainer's advice (overwrite=True, levyattn train --overwrite), which a sweep
    # has no way to follow.
    import levyattn.io
    from levyattn.training.presets import apply_overrides, get_preset
    from levyattn.training.sweep import run_sweep

    preset = apply_overrides(get_preset("digits-vit"),
                             ["epochs=1", "limit_train=32", "limit_test=16", "d_model=8", "batch_size=16"])
    real = levyattn.io.atomic_write

    def killed_at_checkpoint_json(path, write):
        if Path(path).name == "checkpoint.json":
            raise KeyboardInterrupt
        return real(path, write)

    monkeypatch.setattr(levyattn.io, "atomic_write", killed_at_checkpoint_json)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(preset, alphas=[1.2], attentions=["fna"], seeds=[0], out_dir=tmp_path, gap_samples=4)
    monkeypatch.undo()
    run = tmp_path / "runs" / "fna-a1.2-s0"
    before = snapshot(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"checkpoint\.json not found .* delete {re.escape(str(run))} to "
                                                r"train the run again"):
        run_sweep(preset, alphas=[1.2], attentions=["fna"], seeds=[0], out_dir=tmp_path, gap_samples=4)
    assert snapshot(tmp_path) == before
