"""Trainer: reproducibility, exact resume, schedules, checkpoints (toy task, CPU, seconds)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from toy import AugmentedToyTask, ToyTask

from levyattn.training import checkpoint as ck
from levyattn.training.batches import global_batches, is_stand_in
from levyattn.training.trainer import TrainConfig, Trainer, lr_at


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, eval_batch_size=16, lr=3e-2, seed=0, warmup_steps=2, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_metrics(tmp_path):
    a = Trainer(ToyTask(), _cfg(), tmp_path / "a").fit()
    b = Trainer(ToyTask(), _cfg(), tmp_path / "b").fit()
    assert a["history"][-1]["eval_accuracy"] == b["history"][-1]["eval_accuracy"]
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    c = Trainer(ToyTask(), _cfg(seed=1), tmp_path / "c").fit()
    assert [r["train_loss"] for r in a["history"]] != [r["train_loss"] for r in c["history"]]


class Killed(Exception):
    """Stands for the process being killed."""


class DiesAtStep:
    """A task that dies in its training step number ``kill_at + 1``, before that step changes anything."""

    def __init__(self, kill_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kill_at, self.steps = kill_at, 0

    def loss(self, model, batch):
        if self.steps == self.kill_at:
            raise Killed
        self.steps += 1
        return super().loss(model, batch)


class KilledToyTask(DiesAtStep, ToyTask):
    pass


class KilledAugmentedToyTask(DiesAtStep, AugmentedToyTask):
    pass


def _evaluate_checkpoint(run_dir, task: ToyTask, seed: int = 0) -> dict:
    c = ck.load_checkpoint(run_dir)
    model = task.build_model()
    ck.load_model_state(model, c, task.model_type)
    torch.manual_seed(seed)  # the trainer builds the datasets right after seeding
    _, eval_ds = task.datasets()
    loader = torch.utils.data.DataLoader(eval_ds, batch_size=16, collate_fn=task.collate)
    model.eval()
    with torch.no_grad():
        return task.evaluate(model, loader)


# (11, 5) and (13, 1) resume inside an epoch (8 steps an epoch), with dropout drawing on the RNG.
@pytest.mark.parametrize("stop", ["kill", "max_steps"])
@pytest.mark.parametrize("stop_at,every", [(11, 4), (8, 8), (13, 0), (11, 5), (13, 1)])
def test_kill_and_resume_equals_uninterrupted(tmp_path, stop_at, every, stop):
    full_trainer = Trainer(ToyTask(), _cfg(checkpoint_every=every), tmp_path / "full")
    full = full_trainer.fit()
    if stop == "kill":
        # Killed in step stop_at + 1: the last checkpoint is the one written at a multiple of
        # `every` (or an epoch end).
        with pytest.raises(Killed):
            Trainer(KilledToyTask(stop_at), _cfg(checkpoint_every=every), tmp_path / "run").fit()
    else:  # max_steps checkpoints the step it stops at
        stopped = Trainer(ToyTask(), _cfg(checkpoint_every=every, max_steps=stop_at), tmp_path / "run").fit()
        assert stopped["stopped"] and stopped["global_step"] == stop_at
    saved = ck.load_checkpoint(tmp_path / "run").state["position"]
    assert saved["global_step"] == (stop_at if stop == "max_steps" else stop_at - stop_at % (every or 8))
    resumed_trainer = Trainer(ToyTask(), _cfg(checkpoint_every=every), tmp_path / "run", resume=True)
    resumed = resumed_trainer.fit()
    assert resumed["global_step"] == full["global_step"]
    for key in ("train_loss", "eval_accuracy", "eval_loss", "lr"):
        assert [r[key] for r in resumed["history"]] == [r[key] for r in full["history"]], key
    for k, v in full_trainer.model.state_dict().items():
        assert torch.equal(v, resumed_trainer.model.state_dict()[k]), k
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and json.loads(rows[-1])["epoch"] == 3


def test_random_augmentation_in_data_loader_workers_resumes_exactly(tmp_path):
    # Killed in step 14, resumed from the checkpoint of step 10 (epoch 2, step 2 of 8): the workers
    # start mid-epoch, so what they draw must not depend on where their loader started.
    cfg = _cfg(checkpoint_every=5, num_workers=2)
    full_trainer = Trainer(AugmentedToyTask(dropout=0.0), cfg, tmp_path / "full")
    full = full_trainer.fit()
    with pytest.raises(Killed):
        Trainer(KilledAugmentedToyTask(13, dropout=0.0), cfg, tmp_path / "run").fit()
    assert ck.load_checkpoint(tmp_path / "run").state["position"]["step_in_epoch"] == 2
    resumed_trainer = Trainer(AugmentedToyTask(dropout=0.0), cfg, tmp_path / "run", resume=True)
    resumed = resumed_trainer.fit()
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    for k, v in full_trainer.model.state_dict().items():
        assert torch.equal(v, resumed_trainer.model.state_dict()[k]), k
    # num_workers may change on resume: the draws are the same in the main process
    in_main = Trainer(AugmentedToyTask(dropout=0.0), _cfg(checkpoint_every=5, num_workers=0), tmp_path / "main").fit()
    assert [r["train_loss"] for r in in_main["history"]] == [r["train_loss"] for r in full["history"]]
    # and the augmentation really draws (a run without it differs)
    plain = Trainer(ToyTask(dropout=0.0), cfg, tmp_path / "plain").fit()
    assert plain["history"][-1]["train_loss"] != full["history"][-1]["train_loss"]


def test_loading_leaves_the_torch_generator_of_the_main_process_as_it_was(tmp_path):
    # With num_workers 0 the batches are loaded in the main process; the augmentation's draws must
    # not shift the stream dropout draws from: the same run with and without augmentation draws
    # the same dropout masks (compared through the generator state after training).
    states = []
    for task in (AugmentedToyTask(), ToyTask()):
        Trainer(task, _cfg(epochs=1), tmp_path / task.__class__.__name__).fit()
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_a_dataset_that_draws_nothing_is_fetched_without_per_sample_seeding(monkeypatch):
    # The per-sample seeding costs about 13 us a sample; a dataset says it draws nothing beside its
    # own __getitem__, and a subclass with a __getitem__ of its own is seeded until it says so too.
    from levyattn.data.images import ImageDataset
    from levyattn.training import batches as batches_module

    class Plain(torch.utils.data.Dataset):
        draws_random_numbers = False

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor([float(i)])

    class Drawing(Plain):
        def __getitem__(self, i):
            return torch.rand(1)

    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    kw = dict(num_classes=2, scale=255.0, mean=[0.0], std=[1.0])
    assert not batches_module.draws_random_numbers(Plain())
    assert batches_module.draws_random_numbers(Drawing())
    assert batches_module.draws_random_numbers(torch.utils.data.TensorDataset(torch.zeros(4)))
    assert not batches_module.draws_random_numbers(ImageDataset(images, [0, 1, 0, 1], **kw))
    assert batches_module.draws_random_numbers(ImageDataset(images, [0, 1, 0, 1], augment=True, **kw))
    seeds = []
    monkeypatch.setattr(batches_module, "_seed_generators", seeds.append)
    batches_module._SeededBatches(Plain(), torch.stack)[(7, [0, 1, 2], [1, 2, 3])]
    assert seeds == [7]  # the collation only
    seeds.clear()
    batches_module._SeededBatches(Drawing(), torch.stack)[(7, [0, 1, 2], [1, 2, 3])]
    assert seeds == [1, 2, 3, 7]


@pytest.mark.parametrize("max_steps", [11, 16, 3])  # inside epoch 2, at the end of epoch 2 (of 3), inside epoch 1
def test_max_steps_checkpoints_and_reports_the_model_it_stops_at(tmp_path, max_steps):
    # 60 samples / 8 = 8 steps an epoch, checkpoints every 5 steps: none of them falls on step 11 or 3
    result = Trainer(ToyTask(), _cfg(checkpoint_every=5, max_steps=max_steps), tmp_path).fit()
    assert result["stopped"] and result["global_step"] == max_steps
    assert ck.load_checkpoint(tmp_path).state["position"]["global_step"] == max_steps
    assert result["metrics"] == _evaluate_checkpoint(tmp_path, ToyTask())
    assert len(result["history"]) == max_steps // 8  # whole epochs only
    assert result["train_loss"] > 0 and (max_steps % 8 or result["train_loss"] == result["history"][-1]["train_loss"])


def test_resuming_a_run_stopped_by_max_steps_reports_the_model_it_stopped_at(tmp_path):
    # stopped at step 11, inside epoch 2: resumed with the same max_steps there is nothing to train,
    # and the result is still that of step 11's model, not of epoch 1's
    cfg = _cfg(max_steps=11)
    stopped = Trainer(ToyTask(), cfg, tmp_path).fit()
    again = Trainer(ToyTask(), cfg, tmp_path, resume=True).fit()
    assert again["stopped"] and again["global_step"] == 11
    assert again["metrics"] == stopped["metrics"] == _evaluate_checkpoint(tmp_path, ToyTask())
    assert again["train_loss"] == stopped["train_loss"]


@pytest.mark.parametrize("change", [dict(max_steps=5), dict(epochs=1, schedule="constant")])
def test_resuming_with_fewer_steps_than_trained_is_refused(tmp_path, change):
    Trainer(ToyTask(), _cfg(max_steps=11, schedule="constant"), tmp_path).fit()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    with pytest.raises(ck.CheckpointError, match="has trained 11 steps, more than the [58] this run asks for"):
        Trainer(ToyTask(), _cfg(**{"max_steps": 11, "schedule": "constant", **change}), tmp_path, resume=True).fit()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before


def test_files_written_and_atomic(tmp_path):
    Trainer(ToyTask(), _cfg(epochs=2, checkpoint_every=3), tmp_path).fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint.json" in names and "metrics.csv" in names and "config.json" in names
    # exactly one tensors file survives, the one checkpoint.json names; no temp files left
    tensors = [n for n in names if n.endswith(".safetensors")]
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert tensors == [state["tensors_file"]]
    assert not [n for n in names if n.endswith(".tmp")]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "eval_accuracy" in header and "train_loss" in header


def test_checkpoint_roundtrip_and_no_pickle(tmp_path):
    t = Trainer(ToyTask(), _cfg(epochs=1), tmp_path)
    t.fit()
    c = ck.load_checkpoint(tmp_path)
    assert c.model_type == "toy"
    sd = c.model_state_dict()
    for k, v in t.model.state_dict().items():
        assert torch.equal(sd[k], v)
    assert any(k.startswith("optim.") for k in c.tensors)
    assert c.tensors["rng.torch_cpu"].dtype == torch.uint8
    # A state the JSON must round-trip exactly: the optimiser state loads back.
    opt = torch.optim.AdamW(t.model.parameters())
    assert opt is not None


def test_missing_and_corrupt_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.json"):
        ck.load_checkpoint(tmp_path / "nothing")
    Trainer(ToyTask(), _cfg(epochs=1), tmp_path).fit()
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    tensors = tmp_path / state["tensors_file"]
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=state["tensors_file"]):
        ck.load_checkpoint(tmp_path)
    tensors.unlink()
    with pytest.raises(FileNotFoundError, match=state["tensors_file"]):
        ck.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="checkpoint.json"):
        ck.load_checkpoint(tmp_path)


def test_resume_into_other_model_type_is_a_clear_error(tmp_path):
    Trainer(ToyTask(), _cfg(epochs=1), tmp_path).fit()
    with pytest.raises(ck.CheckpointError, match="'toy' model.*'other'"):
        Trainer(ToyTask(model_type="other"), _cfg(epochs=2), tmp_path, resume=True).fit()


def test_schedules():
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=4)
    assert lr_at(cfg, 0, 100, 10) == pytest.approx(0.25)
    assert lr_at(cfg, 4, 100, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 99, 100, 10) < 1e-2
    step = TrainConfig(lr=1.0, schedule="step", step_gamma=0.75)
    assert [lr_at(step, s, 30, 10) for s in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.75, 0.5625])
    assert math.isclose(lr_at(TrainConfig(lr=0.1, schedule="constant"), 50, 100, 10), 0.1)


@pytest.mark.parametrize(
    "kw", [dict(lr=0), dict(epochs=0), dict(schedule="linear"), dict(grad_clip=-1.0), dict(batch_size=2.5)]
)
def test_bad_config_names_the_parameter(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kw)


@pytest.mark.parametrize("betas", [(0.9, 1.0), [-0.1, 0.9], (0.9, float("nan")), (0.9,), (0.9, 0.99, 0.5), 0.9])
def test_betas_out_of_range_are_refused_by_the_config(betas):
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\), got " + re.escape(repr(betas))):
        TrainConfig(betas=betas)


def test_betas_must_be_numbers():
    with pytest.raises(TypeError, match=r"betas must be two numbers in \[0, 1\), got \(True, 0\.9\)"):
        TrainConfig(betas=(True, 0.9))
    assert TrainConfig(betas=[0, 0.5]).betas == (0, 0.5)


@pytest.mark.parametrize("name", ["lr", "weight_decay", "step_gamma", "min_lr_ratio", "grad_clip", "max_steps"])
def test_a_boolean_is_not_a_number_setting(name):
    with pytest.raises(TypeError, match=f"{name} must be a number, got True"):
        TrainConfig(**{name: True})


def test_global_batches_cover_the_epoch():
    b = global_batches(20, 6, seed=3, epoch=1)
    assert sorted(i for x in b for i in x) == list(range(20))
    assert b != global_batches(20, 6, seed=3, epoch=2)
    # the same batches for any number of processes, a last batch of one included
    assert global_batches(13, 6, 0, 0, world_size=2) == global_batches(13, 6, 0, 0)
    assert len(global_batches(13, 6, 0, 0)) == 3


def test_a_task_missing_members_is_rejected():
    class Half:
        name = "half"

        def build_model(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="missing.*datasets"):
        Trainer(Half(), _cfg())


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 17), world=st.integers(1, 3), seed=st.integers(0, 5),
       epoch=st.integers(0, 3))
def test_shards_partition_each_epoch(n, bs, world, seed, epoch):
    if bs < world:
        with pytest.raises(ValueError, match="batch_size"):
            global_batches(n, bs, seed, epoch, world)
        return
    batches = global_batches(n, bs, seed, epoch, world)
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(n))  # every sample once, whatever the number of processes
    for b in batches:
        shards = [b[r::world] for r in range(world)]
        assert sorted(i for s in shards for i in s) == sorted(b)
        assert all(bool(s) != is_stand_in(b, r) for r, s in enumerate(shards))


@settings(max_examples=40, deadline=None)
@given(step=st.integers(0, 500), warm=st.integers(0, 50))
def test_cosine_lr_stays_in_range(step, warm):
    cfg = TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=warm, min_lr_ratio=0.1)
    lr = lr_at(cfg, step, 500, 50)
    assert 0 < lr <= 1e-3 + 1e-15
    if step >= warm:
        assert lr >= 1e-4 - 1e-15


def test_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        model_type = "tied"

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    m = Tied()
    ck.save_checkpoint(tmp_path, model=m, model_type="tied", model_config={})
    loaded = ck.load_checkpoint(tmp_path)
    assert loaded.state["model_aliases"] == {"out.weight": "emb.weight"}
    m2 = Tied()
    ck.load_model_state(m2, loaded)
    assert torch.equal(m2.emb.weight, m.emb.weight) and m2.out.weight is m2.emb.weight
