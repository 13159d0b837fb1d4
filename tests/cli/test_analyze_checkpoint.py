"""``levyattn analyze RUN_DIR --input ... | --preset-data N`` on tiny models trained for a few
steps with the real trainer and presets."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from levyattn.analysis import spectral_gap
from levyattn.cli import analyze as analyze_cli
from levyattn.cli import main
from levyattn.training.checkpoint import load_model
from levyattn.training.presets import apply_overrides, get_preset, train_preset

MS = ["data.task_args.n_train=48", "data.task_args.n_test=12", "data.task_args.seq_len=16",
      "data.task_args.d_min=4", "data.task_args.d_max=6"]


def _train(out, preset: str, overrides: list[str]):
    p = apply_overrides(get_preset(preset), ["epochs=1", "batch_size=16", *overrides])
    train_preset(p, out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    return {
        # rescale on (kappa > 1) keeps this untrained-ish one-layer model's rows spread out
        "text": _train(root / "text", "multiscale-1layer", [*MS, "rescale=true"]),
        "vit": _train(root / "vit", "digits-vit", ["limit_train=32", "limit_test=16", "model.num_layers=2",
                                                    "model.num_heads=2"]),
        "lm": _train(root / "lm", "lm-toy-fna", ["data.limit_train=16", "data.limit_eval=4", "num_layers=1",
                                                  "d_model=16", "num_heads=2", "data.block_size=24"]),
    }


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    analyze_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_text_classifier_token_ids(runs, tmp_path):
    model = load_model(runs["text"]).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "ids.npy", ids.numpy())
    out = tmp_path / "o1"
    assert main(["analyze", str(runs["text"]), "--input", str(tmp_path / "ids.npy"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"]["model_type"] == "text_classifier" and summary["source"]["batch"] == 3
    with torch.no_grad():
        output = model(ids, output_attentions=True)
    logits, weights = output.logits, output.attentions
    assert summary["source"]["predictions"] == logits.argmax(-1).tolist()
    assert len(summary["records"]) == 3 * model.config.num_heads * model.config.num_layers
    expect = spectral_gap(weights[0].double())
    for rec in summary["records"]:
        assert rec["n_valid"] == 16
        assert rec["spectral_gap"] == pytest.approx(float(expect[rec["batch"], rec["head"]]), abs=1e-9)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 3 and "text_classifier" in html

    # ragged .txt: padding is masked, and the valid part gives the same matrices as running
    # the model on the short sequence alone (padding never attended to)
    (tmp_path / "ids.txt").write_text("1 2 3 4 5 6\n7, 8, 9, 10, 11, 12, 13, 14\n\n")
    out2 = tmp_path / "o2"
    assert main(["analyze", str(runs["text"] / "checkpoint.json"), "--input", str(tmp_path / "ids.txt"),
                 "--out", str(out2)]) == 0
    recs = json.loads((out2 / "summary.json").read_text())["records"]
    assert [r["n_valid"] for r in recs] == [6, 8]
    with torch.no_grad():
        w_short = model(torch.tensor([[1, 2, 3, 4, 5, 6]]), output_attentions=True).attentions
    assert recs[0]["spectral_gap"] == pytest.approx(float(spectral_gap(w_short[0][0, 0].double())), abs=1e-6)


def test_preset_data_matches_task(runs, tmp_path):
    out = tmp_path / "o"
    assert main(["analyze", str(runs["text"]), "--preset-data", "5", "--out", str(out), "--no-paths"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    src = summary["source"]
    assert src["preset_data"] == 5 and 0.0 <= src["metrics"]["accuracy"] <= 1.0
    html = (out / "report.html").read_text()  # the metrics as a table, not a Python dict
    assert "<td>accuracy</td>" in html and "{&#x27;accuracy&#x27;" not in html and "{'accuracy'" not in html
    assert len(summary["records"]) == 5 and all(r["mean_path_length"] is None for r in summary["records"])
    # more examples than the test split has: all of them
    assert main(["analyze", str(runs["text"]), "--preset-data", "1000", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["source"]["preset_data"] == 12


def test_vit_images_every_layer(runs, tmp_path):
    torch.save(torch.rand(1, 8, 8), tmp_path / "img.pt")  # (C, H, W): one image
    out = tmp_path / "o"
    assert main(["analyze", str(runs["vit"]), "--input", str(tmp_path / "img.pt"), "--out", str(out),
                 "--head", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [layer["name"] for layer in summary["layers"]] == ["layer0", "layer1"]
    assert all(layer["shape"] == [1, 2, 4, 4] for layer in summary["layers"])  # 4x4 patches of 8x8, mean pooling
    for name in ("spectrum", "attention", "diffusion_map"):
        for layer in ("layer0", "layer1"):
            assert (out / f"{name}_{layer}.png").stat().st_size > 1000
    assert (out / "report.html").read_text().count("data:image/png;base64") == 6
    # one layer chosen: plain file names, three figures
    out2 = tmp_path / "o2"
    assert main(["analyze", str(runs["vit"]), "--preset-data", "4", "--out", str(out2), "--layer", "layer1"]) == 0
    assert (out2 / "spectrum.png").is_file() and not (out2 / "spectrum_layer0.png").exists()
    assert json.loads((out2 / "summary.json").read_text())["source"]["metrics"]["accuracy"] >= 0.0


def test_bad_inputs(runs, tmp_path):
    text, vit = str(runs["text"]), str(runs["vit"])
    with pytest.raises(ValueError, match="exactly one of --input DATA and --preset-data"):
        analyze_cli.run(_args([text, "--out", str(tmp_path / "x")]))
    with pytest.raises(ValueError, match="exactly one of"):
        analyze_cli.run(_args([text, "--input", "a.npy", "--preset-data", "2"]))
    np.save(tmp_path / "big.npy", np.full((1, 5), 999))
    with pytest.raises(ValueError, match=r"big.npy: token ids must lie in \[0, "):
        analyze_cli.run(_args([text, "--input", str(tmp_path / "big.npy")]))
    np.save(tmp_path / "long.npy", np.zeros((1, 40), dtype=np.int64))
    with pytest.raises(ValueError, match="length must be <= 16"):
        analyze_cli.run(_args([text, "--input", str(tmp_path / "long.npy")]))
    np.save(tmp_path / "float.npy", np.zeros((1, 5)))
    with pytest.raises(ValueError, match="must be integers"):
        analyze_cli.run(_args([text, "--input", str(tmp_path / "float.npy")]))
    (tmp_path / "bad.txt").write_text("1 2 x\n")
    with pytest.raises(ValueError, match="bad.txt, line 1"):
        analyze_cli.run(_args([text, "--input", str(tmp_path / "bad.txt")]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        analyze_cli.run(_args([text, "--input", "some words"]))
    torch.save({"a": torch.zeros(1, 5, dtype=torch.long), "b": torch.zeros(1, 5, dtype=torch.long)},
               tmp_path / "two.pt")
    with pytest.raises(ValueError, match="several entries"):
        analyze_cli.run(_args([text, "--input", str(tmp_path / "two.pt")]))
    analyze_cli.run(_args([text, "--input", str(tmp_path / "two.pt"), "--input-key", "b",
                           "--out", str(tmp_path / "ok")]))
    torch.save(torch.rand(2, 3, 8, 8), tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match=r"images must be \(B, 1, 8, 8\)"):
        analyze_cli.run(_args([vit, "--input", str(tmp_path / "rgb.pt")]))
    with pytest.raises(ValueError, match="--preset-data must be a positive"):
        analyze_cli.run(_args([vit, "--preset-data", "0"]))
    with pytest.raises(FileNotFoundError, match="checkpoint.json does not exist"):
        analyze_cli.run(_args([str(tmp_path), "--preset-data", "2"]))
    np.save(tmp_path / "w.npy", np.full((4, 4), 0.25))
    with pytest.raises(ValueError, match="need a checkpoint"):
        analyze_cli.run(_args([str(tmp_path / "w.npy"), "--input", "x.npy"]))
    assert main(["analyze", vit, "--out", str(tmp_path / "y")]) == 2


def test_lm_text_string(runs, tmp_path, capsys):
    from levyattn.training.tasks.tokenized import load_tokenizer_beside

    out = tmp_path / "o"
    assert main(["analyze", str(runs["lm"]), "--input", "the cat sees a dog", "--out", str(out), "--no-paths"]) == 0
    n = len(load_tokenizer_beside(runs["lm"]).encode("the cat sees a dog"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"]["length"] == n and summary["layers"][0]["shape"] == [1, 2, n, n]
    table = capsys.readouterr().out
    assert "layer0  0" in table and " - " in table  # paths not computed: '-', not 'inf'
