from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tokenizer

from levyattn.cli import main
from levyattn.cli.lens import parse_distances


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    path = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                      intermediate_size=64, max_position_embeddings=512, vocab_size=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    make_tokenizer(["the cat sat on the mat", "a dog ran far away"]).save_pretrained(path)
    return path


def test_lens_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    atlas = tmp_path / "atlas.json"
    rc = main(["lens", str(model_dir), "--prompts", "3", "--seeds", "42", "--distances", "30,60,120",
               "--token-range", "3", "60", "--bootstrap", "50", "--level", "0.9", "--device", "cpu",
               "--out", str(out), "--atlas", str(atlas)])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("gamma 90% CI", "R² power law", "R² exponential", "alpha", "s = (gamma - 1)/2", "regime",
                 "Lévy analogy", "report:", "feature-space"):
        assert word in text
    for name in ("lens.json", "report.html", "decay.png", "gamma_heatmap.png", "layers.png"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "<th>90% lo</th>" in page and "95%" not in page  # the per-distance bars take --level too
    data = json.loads((out / "lens.json").read_text())
    assert data["measurement"]["distances"] == [30, 60, 120] and len(data["gamma_ci"]) == 2
    assert data["ci_level"] == 0.9  # --level reaches the interval and is recorded beside it
    assert (data["n_boot"], data["n_boot_valid"]) == (50, 50) and "50 of 50 resamples valid" in text
    assert data["fractional"]["regime_rule"].startswith("90% CI [") and "95%" not in text.split("time")[0]
    (entry,) = json.loads(atlas.read_text())["entries"]
    assert entry["gamma"] == pytest.approx(data["gamma"]) and entry["protocol"] == "published"
    # where the entry went and which one it is, as `levyattn atlas --add` says it
    assert f"atlas:  added {entry['model']} (random, gamma {entry['gamma']:.4f}) to {atlas}\n" in text
    assert entry["ci"] == pytest.approx(data["gamma_ci"]) and entry["ci_level"] == 0.9
    # the same command run again measures the same and does not list it twice (it was appended again)
    assert main(["lens", str(model_dir), "--prompts", "3", "--seeds", "42", "--distances", "30,60,120",
                 "--token-range", "3", "60", "--bootstrap", "50", "--level", "0.9", "--device", "cpu",
                 "--out", str(out), "--atlas", str(atlas), "--no-plots"]) == 0
    assert "already holds this measurement (entry 0" in capsys.readouterr().out
    assert json.loads(atlas.read_text())["entries"] == [entry]


def test_lens_cli_piped_output(model_dir, tmp_path, capfd):
    """A pipe, not a terminal: plain progress lines, the attention path said, no LOAD REPORT of the unused head."""
    rc = main(["lens", str(model_dir), "--prompts", "3", "--seeds", "42", "7", "--distances", "30,60",
               "--bootstrap", "20", "--device", "cpu", "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    err = capfd.readouterr().err
    assert "lens: prompt 6/6, elapsed" in err and "ETA" in err and "\r" not in err
    assert "attention: only the rows read" in err
    assert "LOAD REPORT" not in err and "lm_head" not in err and "Loading weights" not in err


def test_lens_cli_small_vocabulary_without_tokenizer(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=256, vocab_size=500)).save_pretrained(
        tmp_path / "gpt2"
    )  # no tokenizer saved: transformers makes an empty one (vocab_size 0)
    rc = main(["lens", str(tmp_path / "gpt2"), "--prompts", "2", "--seeds", "42", "--distances", "30,60,120",
               "--bootstrap", "20", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-plots"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "lens.json").read_text())
    assert data["measurement"]["info"]["token_range"] == [10, 499]
    assert data["measurement"]["info"]["from"] == "config.vocab_size (small vocabulary: range scaled)"
    # a text corpus needs the tokenizer: the command line says what to do there, Python callers get tokenizer=
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n" * 50)
    rc = main(["lens", str(tmp_path / "gpt2"), "--corpus", str(tmp_path / "corpus.txt"), "--prompts", "2",
               "--seeds", "42", "--distances", "30,60", "--device", "cpu", "--out", str(tmp_path / "o2"), "--no-plots"])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer=" not in err and "load the model by path" not in err
    assert f"--corpus {tmp_path / 'corpus.txt'} is text" in err and "tokenizer.save_pretrained(FOLDER)" in err
    assert "--corpus random" in err and not (tmp_path / "o2").exists()
    from levyattn.lens import measure_decay

    with pytest.raises(ValueError, match=r"pass tokenizer= \(or load the model by path\)"):
        measure_decay(str(tmp_path / "gpt2"), corpus=str(tmp_path / "corpus.txt"), n_prompts=2, seeds=[42],
                      distances=[30, 60], device="cpu")


def test_lens_help_cites_the_docs(capsys):
    with pytest.raises(SystemExit):
        main(["lens", "--help"])
    text = capsys.readouterr().out
    cited = re.findall(r"[\w./-]+\.md", text)
    assert "docs/lens.md" in cited and all(name.startswith("docs/") for name in cited)


def test_lens_cli_errors(model_dir, tmp_path, capsys):
    assert main(["lens", str(model_dir), "--distances", "30,600", "--token-range", "3", "60",
                 "--out", str(tmp_path)]) == 2
    assert "context of 512" in capsys.readouterr().err
    assert main(["lens", str(tmp_path / "missing" / "x" / "y"), "--out", str(tmp_path)]) == 2
    assert "not a valid" in capsys.readouterr().err


def test_parse_distances():
    assert parse_distances("published") is None
    assert parse_distances("30, 60,120") == [30, 60, 120]
    grid = parse_distances("log:30:2000:8")
    assert grid[0] == 30 and grid[-1] == 2000 and len(grid) == 8
    with pytest.raises(ValueError, match="distances"):
        parse_distances("30,abc")
    with pytest.raises(ValueError, match="START"):
        parse_distances("log:100:30:4")


def test_lens_cli_warns_of_weights_missing_from_the_checkpoint(model_dir, tmp_path, capfd):
    """The LOAD REPORT is silenced, but a backbone weight the checkpoint lacks is still said."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    rc = main(["lens", str(broken), "--prompts", "1", "--seeds", "42", "--distances", "30,60", "--bootstrap", "10",
               "--device", "cpu", "--out", str(tmp_path / "out"), "--no-plots"])
    assert rc == 0
    err = capfd.readouterr().err
    assert "warning: the checkpoint lacks 1 weight(s)" in err and "layers.0.self_attn.q_proj.weight" in err
    data = json.loads((tmp_path / "out" / "lens.json").read_text())
    assert data["measurement"]["info"]["load"]["missing_keys"] == ["layers.0.self_attn.q_proj.weight"]


def test_lens_cli_measures_a_saved_fna_model_as_fna(tmp_path, capfd):
    from transformers import LlamaConfig, LlamaForCausalLM

    from levyattn.integrations.huggingface import to_fna

    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         hidden_size=32, intermediate_size=64, max_position_embeddings=256,
                                         vocab_size=64))
    to_fna(model, alpha=1.2, bandwidth=2.0)
    model.save_pretrained(tmp_path / "fna")
    rc = main(["lens", str(tmp_path / "fna"), "--prompts", "2", "--seeds", "42", "--distances", "30,60,120",
               "--token-range", "3", "60", "--bootstrap", "20", "--out", str(tmp_path / "out"), "--no-plots"])
    assert rc == 0
    assert "attention: FNA, weights from levyattn's reference kernel" in capfd.readouterr().err
    assert json.loads((tmp_path / "out" / "lens.json").read_text())["measurement"]["info"]["fna_attention"] is True


@pytest.mark.parametrize(
    "options, message",
    [
        (["--bootstrap", "5"], "--bootstrap must be >= 10"),
        (["--level", "1.5"], r"--level must be in \(0, 1\), got 1.5"),
        (["--d-min", "-1"], "--d-min must be a positive number"),
        (["--tol", "-0.1"], "--tol must be a number >= 0"),
        (["--token-range", "9", "3"], r"--token-range \(9, 3\) is empty or negative; it needs 0 <= low <= high"),
        (["--distances", "30,0"], "--distances must be integers >= 1"),
        (["--distances", "10,20,30"], "leave 1 distance"),
        (["--corpus", "no-such-file.txt"], "--corpus no-such-file.txt: file not found"),
        (["--prompts", "0"], "--prompts must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--seeds", "42", "42"], r"--seeds must be distinct, got \[42, 42\] with \[42\] repeated"),
        (["--protocol", "dense", "--seq-len", "40"], r"--distances \[60\] do not fit a dense pass of --seq-len 40"),
    ],
)
def test_lens_cli_refuses_bad_options_before_loading_the_model(options, message, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("levyattn.lens.measure_decay", never)
    argv = ["lens", str(tmp_path / "model"), "--distances", "30,60", "--out", str(tmp_path), "--no-plots"]
    assert main(argv + options) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "library, options",
    [
        ({"n_prompts": 0}, ["--prompts", "0"]),
        ({"batch_size": 0}, ["--batch-size", "0"]),
        ({"seeds": [42, 42]}, ["--seeds", "42", "42"]),
        ({"token_range": (9, 3)}, ["--token-range", "9", "3"]),
        ({"corpus": "no-such-file.txt"}, ["--corpus", "no-such-file.txt"]),
        ({"distances": [30, 0]}, ["--distances", "30,0"]),
        ({"protocol": "dense", "distances": [30, 60], "dense": 40}, ["--protocol", "dense", "--seq-len", "40"]),
        ({"d_min": -1.0}, ["--d-min", "-1"]),
        ({"n_boot": 5}, ["--bootstrap", "5"]),
        ({"level": 1.5}, ["--level", "1.5"]),
        ({"tol": -0.1}, ["--tol", "-0.1"]),
    ],
)
def test_lens_cli_and_library_refuse_an_option_with_one_message(library, options, tmp_path, capsys):
    """The command line and measure_decay / analyze_decay run the same check: one message, with the option's name."""
    from test_fit import _noisy_measurement

    from levyattn.cli.lens import OPTION_NAMES
    from levyattn.lens import DenseOptions, analyze_decay, measure_decay

    if library.get("dense"):
        library = {**library, "dense": DenseOptions(seq_len=library["dense"])}
    analysis = {k: library.pop(k) for k in ("d_min", "n_boot", "level", "tol") if k in library}
    with pytest.raises((ValueError, FileNotFoundError)) as refused:
        if analysis:
            analyze_decay(_noisy_measurement(0), **analysis)
        else:
            measure_decay(None, **library)
    message = str(refused.value).removesuffix(" (--token-range LOW HIGH on the command line)")  # Python users' hint
    for param, option in OPTION_NAMES.items():
        message = re.sub(rf"\b{param}\b", option, message)
    argv = ["lens", str(tmp_path / "model"), "--distances", "30,60", "--out", str(tmp_path), "--no-plots"]
    assert main(argv + options) == 2
    assert capsys.readouterr().err.strip() == f"levyattn lens: error: {message}"


def test_a_token_range_past_the_saved_vocabulary_is_refused_before_the_weights_load(model_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the token range was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", never)
    assert main(["lens", str(model_dir), "--distances", "30,60", "--token-range", "3", "64", "--out", str(tmp_path),
                 "--no-plots"]) == 2  # fmt: skip
    assert "token_range (3, 64) exceeds the vocabulary of 64 tokens (config.vocab_size)" in capsys.readouterr().err
