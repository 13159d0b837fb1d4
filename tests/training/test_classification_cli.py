"""Presets, the classification task on digits and sweeps (table/JSON/CSV, skip on re-run)."""

from __future__ import annotations

import json

import pytest

from levyattn.cli import main
from levyattn.training import checkpoint as ck
from levyattn.training.presets import all_presets, apply_overrides, get_preset, train_preset
from levyattn.training.sweep import SweepResult, correlations, grid, restart_seed, run_sweep, select_restarts

TINY = ["epochs=1", "limit_train=64", "limit_test=32", "d_model=8", "batch_size=16"]


def _digits(*extra: str) -> dict:
    return apply_overrides(get_preset("digits-vit"), TINY + list(extra))


def test_paper_presets_hold_the_papers_settings():
    p = all_presets()
    one = p["imdb-1layer-h16"]
    assert one["model"]["num_layers"] == 1 and one["model"]["num_heads"] == 1 and one["model"]["d_model"] == 16
    assert one["model"]["orthogonal"] and one["model"]["qk_share"] and one["model"]["rescale"]
    assert one["sweep"]["alphas"] == [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
    assert (one["data"]["max_len"], one["train"]["batch_size"], one["train"]["lr"], one["train"]["epochs"]) == (
        512, 16, 1e-3, 25)
    deep = p["imdb-6layer"]
    assert (deep["model"]["num_layers"], deep["model"]["num_heads"], deep["model"]["d_model"]) == (6, 8, 256)
    assert deep["train"]["schedule"] == "step" and deep["train"]["step_gamma"] == 0.75
    assert deep["sweep"]["seeds"] == [0, 1, 2, 3, 4] and deep["sweep"]["alphas"] == [1.2, 2.0]
    assert p["cifar10-vit"]["sweep"]["attention"] == ["fna", "softmax"]


def test_overrides():
    p = apply_overrides(get_preset("imdb-1layer-h8"), ["data_dir=/x/aclImdb", "train.lr=3e-4", "alpha=1.6", "seed=4"])
    assert p["data"]["data_dir"] == "/x/aclImdb" and p["train"]["lr"] == 3e-4
    assert p["model"]["alpha"] == 1.6 and p["train"]["seed"] == 4
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(p, ["nonsense"])
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_real_dataset_without_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        train_preset(get_preset("imdb-1layer-h8"), tmp_path)


def test_digits_train_and_reload(tmp_path):
    result, trainer = train_preset(_digits(), tmp_path)
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    model = ck.load_model(tmp_path)
    assert model.model_type == "vit"
    with pytest.raises(ck.CheckpointError, match="'vit' model.*'text_classifier'"):
        ck.load_model(tmp_path, model_type="text_classifier")


def test_train_cli_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [x for s in TINY for x in ("--set", s)]
    # 64 samples / 16 = 4 steps an epoch: max_steps stops the run after epoch 1 of 2
    args = ["train", "--preset", "digits-vit", "--out", str(out), "--no-progress", *sets, "--set", "epochs=2",
            "--set", "max_steps=4"]
    assert main(args) == 0
    assert "accuracy" in capsys.readouterr().out
    # under the cosine schedule epochs shapes the learning rate: a resumed run may not change it
    assert main(["train", "--resume", str(out), "--set", "epochs=3", "--no-progress"]) != 0
    assert "epochs: 2 -> 3" in capsys.readouterr().err
    # resume without the step limit: continues from the checkpoint
    assert main(["train", "--resume", str(out), "--set", "max_steps=null", "--no-progress"]) == 0
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_sweep_tables_and_skip_on_rerun(tmp_path):
    logs = []
    res = run_sweep(_digits(), alphas=[1.2], attentions=["fna", "softmax"], seeds=[0, 1], out_dir=tmp_path,
                    gap_samples=8, log=logs.append)
    assert len(res.runs) == 4 and not res.skipped
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["summary"]) == 2 and {r["attention"] for r in data["summary"]} == {"fna", "softmax"}
    assert all(0.0 <= r["spectral_gap"] <= 1.0 + 1e-9 for r in data["runs"])
    assert "pearson_r" in data["correlation"]
    assert (tmp_path / "runs.csv").read_text().count("\n") == 5
    assert "± " in (tmp_path / "table.md").read_text()
    (comparison,) = data["comparisons"]  # FNA at alpha 1.2 against softmax, paired by seed
    assert comparison["seeds"] == [0, 1] and comparison["n"] == 2
    acc = {(r["attention"], r["seed"]): r["accuracy"] for r in data["runs"]}
    assert comparison["mean_diff"] == pytest.approx(sum(acc["fna", s] - acc["softmax", s] for s in (0, 1)) / 2)
    assert "accuracy, paired by seed: " in (tmp_path / "table.md").read_text()
    again = run_sweep(_digits(), alphas=[1.2], attentions=["fna", "softmax"], seeds=[0, 1], out_dir=tmp_path,
                      gap_samples=8)
    assert sorted(again.skipped) == sorted(r["name"] for r in res.runs)
    assert [r["accuracy"] for r in again.runs] == [r["accuracy"] for r in res.runs]
    with pytest.raises(ValueError, match="other settings than this sweep asks for: lr: "):
        run_sweep(_digits("lr=0.5"), alphas=[1.2], attentions=["fna"], seeds=[0], out_dir=tmp_path)
    # the description is no setting: a redescribed preset finds its runs
    redescribed = {**_digits(), "description": "the same runs under another name"}
    found = run_sweep(redescribed, alphas=[1.2], attentions=["fna"], seeds=[0], out_dir=tmp_path)
    assert found.skipped == ["fna-a1.2-s0"]


@pytest.mark.parametrize(("alphas", "attentions", "seeds", "message"), [
    ([1.2], ["fna"], [0, 1, 0], r"seeds must be distinct, got \[0\] more than once in \[0, 1, 0\]"),
    ([1.2], ["fna", "softmax", "fna"], [0], r"attentions must be distinct, got \['fna'\]"),
    ([1.2, 1.2], ["fna"], [0], r"alphas must differ in their first 6 significant digits .* got 1\.2 and 1\.2"),
    ([1.2, 1.20000001], ["fna"], [0], r"got 1\.2 and 1\.20000001"),
])
def test_a_grid_naming_one_run_twice_is_refused(alphas, attentions, seeds, message):
    with pytest.raises(ValueError, match=message):
        grid(alphas, attentions, seeds)


def test_restart_seeds_and_grid():
    assert restart_seed(3, 0) == 3  # restart 0 is the plain run
    seeds = {restart_seed(s, r) for s in range(4) for r in range(4)}
    assert len(seeds) == 16
    runs = grid([1.2], ["fna", "softmax"], [0, 1], restarts=3)
    assert len(runs) == 12
    assert [r["name"] for r in runs[:3]] == ["fna-a1.2-s0", "fna-a1.2-s0-r1", "fna-a1.2-s0-r2"]
    assert runs[1]["train_seed"] == restart_seed(0, 1) and runs[1]["seed"] == 0
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"restarts must be an int >= 1, got {bad}"):
            grid([1.2], ["fna"], [0], restarts=bad)


def test_select_restarts_keeps_the_lowest_training_loss():
    def row(seed, restart, loss, attention="fna"):
        return {"attention": attention, "alpha": 1.2, "seed": seed, "restart": restart, "final_train_loss": loss}

    rows = [row(0, 0, 0.6), row(0, 1, 0.2), row(0, 2, 0.4), row(1, 0, 0.3), row(1, 1, 0.3), row(0, 0, 0.9, "softmax")]
    kept = [(r["attention"], r["seed"], r["restart"]) for r in select_restarts(rows)]
    assert kept == [("fna", 0, 1), ("fna", 1, 0), ("softmax", 0, 0)]  # a tie keeps the earlier restart
    assert [r["selected"] for r in rows] == [False, True, False, True, False, True]


def test_table_says_why_a_correlation_is_undefined():
    summary = [{"attention": "fna", "alpha": 1.2, "n": 2, "accuracy_mean": 0.9, "accuracy_std": 0.01,
                "gap_mean": 0.1, "gap_std": 0.0, "params": 10, "time_mean": 1.0}]
    few = SweepResult(None, [], summary, correlations([0.9, 0.8], [0.1, 0.2]))
    assert "over 2 runs: undefined (needs 3 or more runs" in few.table()
    enough = SweepResult(None, [], summary, correlations([0.9, 0.8, 0.7], [0.1, 0.2, 0.4]))
    assert "over 3 runs: Pearson r = -0.982" in enough.table() and "undefined" not in enough.table()


def test_sweep_with_restarts(tmp_path, capsys):
    plain = run_sweep(_digits(), alphas=[1.2], attentions=["fna"], seeds=[0, 1], out_dir=tmp_path / "plain",
                      gap_samples=8)
    sets = [x for s in TINY for x in ("--set", s)]
    out = tmp_path / "restarts"
    assert main(["sweep", "--preset", "digits-vit", "--alphas", "1.2", "--attention", "fna", "--seeds", "0,1",
                 "--restarts", "2", "--out", str(out), "--no-progress", *sets]) == 0
    assert "lowest final training loss of 2 restarts" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["restarts"] == 2 and len(data["runs"]) == 4 and data["summary"][0]["n"] == 2
    by_name = {r["name"]: r for r in data["runs"]}
    # restart 0 is the plain run: same initialisation, same result
    assert by_name["fna-a1.2-s0"]["accuracy"] == plain.runs[0]["accuracy"]
    stored = json.loads((out / "runs" / "fna-a1.2-s1-r1" / "result.json").read_text())
    assert stored["preset"]["train"]["seed"] == restart_seed(1, 1) != 1
    for seed in (0, 1):
        pair = [by_name[f"fna-a1.2-s{seed}"], by_name[f"fna-a1.2-s{seed}-r1"]]
        assert sum(r["selected"] for r in pair) == 1
        kept = next(r for r in pair if r["selected"])
        assert kept["final_train_loss"] == min(r["final_train_loss"] for r in pair)
    kept_mean = sum(r["accuracy"] for r in data["runs"] if r["selected"]) / 2
    assert data["summary"][0]["accuracy_mean"] == pytest.approx(kept_mean)


@pytest.mark.slow
def test_progress_bars_stay_off_a_stderr_that_is_not_a_terminal(tmp_path, capsys):
    # pytest's captured stderr is no terminal, as a pipe or a log file is not: the bars would
    # fill it with carriage-return redraws, so only the printed lines may come out
    assert main(["train", "--preset", "digits-vit", "--out", str(tmp_path / "run"), "--set", "epochs=1"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "it/s" not in captured.err


def test_table_shows_small_gaps_and_single_seeds_as_they_are():
    row = {"attention": "fna", "alpha": 1.2, "accuracy_mean": 0.9, "accuracy_std": 0.01, "gap_mean": 1.7e-5,
           "gap_std": 2.1e-8, "params": 10, "time_mean": 1.0}
    table = SweepResult(None, [], [dict(row, n=3)], correlations([0.9], [0.1])).table()
    assert "| 0.9000 ± 0.0100 | 1.7e-05 ± 2.1e-08 |" in table and "0.0000" not in table
    one_seed = SweepResult(None, [], [dict(row, n=1, accuracy_std=0.0, gap_std=0.0)], correlations([0.9], [0.1]))
    assert "| 0.9000 | 1.7e-05 |" in one_seed.table() and "±" not in one_seed.table()

