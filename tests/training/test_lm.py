"""Language modelling on tiny text files: training lowers perplexity, the generate CLI,
cached = uncached generation, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from levyattn.cli import main as cli_main
from levyattn.training.checkpoint import CheckpointError, save_checkpoint
from levyattn.training.tasks.lm import BlockDataset, LMTask, generate_text
from levyattn.training.tasks.tokenized import load_model_with_tokenizer
from levyattn.training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/training/conftest.py

LINES = [
    "the cat sat on the mat and the dog sat on the log .",
    "a bird sang in the tree while the sun rose over the hill .",
    "the cat saw the bird and the bird flew over the hill .",
]


def tiny_preset(train_file, eval_file, **train) -> dict:
    return {
        "task": "lm", "model_type": "lm",
        "model": {"d_model": 32, "num_layers": 1, "num_heads": 2, "dropout": 0.0, "attention": "fna", "alpha": 1.2,
                  "tie_embeddings": True},  # tied: the checkpoint stores the shared matrix once
        "data": {"dataset": "text", "train_file": str(train_file), "eval_file": str(eval_file), "vocab_size": 60,
                 "block_size": 16},
        "train": {"epochs": 6, "batch_size": 8, "lr": 5e-3, "schedule": "constant", "weight_decay": 0.0,
                  "device": "cpu", "seed": 0, **train},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    train_file, eval_file = root / "train.txt", root / "valid.txt"
    train_file.write_text("".join(line + "\n" for line in LINES * 12), encoding="utf-8")
    eval_file.write_text("".join(line + "\n" for line in LINES * 2), encoding="utf-8")
    preset = tiny_preset(train_file, eval_file)
    task = LMTask(preset)
    run = root / "run"
    result = Trainer(task, TrainConfig.from_dict(preset["train"]), run).fit()  # writes the tokenizer too
    return {"task": task, "result": result, "run": run, "root": root}


def test_training_lowers_perplexity(trained):
    hist = trained["result"]["history"]
    vocab = trained["task"].tokenizer.vocab_size
    assert hist[0]["eval_ppl"] < vocab  # better than uniform after one epoch
    assert hist[-1]["eval_ppl"] < hist[0]["eval_ppl"]
    assert hist[-1]["eval_ppl"] == pytest.approx(math.exp(hist[-1]["eval_loss"]), rel=1e-6)
    assert hist[-1]["eval_ppl"] < 3.0


def test_generate_cli_and_cache(trained, capsys):
    run = str(trained["run"])
    assert cli_main(["generate", run, "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the cat")
    assert "tokens/s" in captured.err
    model, tok = load_model_with_tokenizer(run, "lm")
    for kwargs in ({"temperature": 0.0}, {"temperature": 0.8, "top_k": 5, "seed": 4}):
        a, _ = generate_text(model, tok, "the bird", max_new_tokens=12, use_cache=True, **kwargs)
        b, _ = generate_text(model, tok, "the bird", max_new_tokens=12, use_cache=False, **kwargs)
        assert a == b


def test_bad_inputs(tmp_path, trained, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        LMTask(tiny_preset(empty, good)).datasets()
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        LMTask(tiny_preset(tmp_path / "nope.txt", good)).datasets()
    with pytest.raises(ValueError, match="block_size"):
        BlockDataset([1, 2, 3], 8)
    preset = tiny_preset(good, good)
    preset["data"]["block_size"] = 0
    with pytest.raises(ValueError, match="data.block_size"):
        LMTask(preset)
    # A translation (seq2seq) checkpoint is not a language model.
    from levyattn.models import Seq2SeqTransformer

    s2s = Seq2SeqTransformer({"src_vocab_size": 9, "tgt_vocab_size": 9, "d_model": 8, "num_heads": 2,
                              "num_encoder_layers": 1, "num_decoder_layers": 1, "max_len": 8})
    save_checkpoint(tmp_path / "s2s", model=s2s, model_type="seq2seq", model_config=s2s.config.to_dict())
    with pytest.raises(CheckpointError, match=r"'seq2seq'.*'lm'"):
        load_model_with_tokenizer(tmp_path / "s2s", "lm")
    assert cli_main(["generate", str(tmp_path / "s2s"), "--prompt", "hi"]) == 2
    assert "holds a 'seq2seq' model" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"model_type must be one of \['lm', 'seq2seq'\], got 'vit'"):
        load_model_with_tokenizer(trained["run"], "vit")
    model, tok = load_model_with_tokenizer(trained["run"], "lm")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_text(model, tok, "")
    torch.manual_seed(0)


def test_a_tokenizer_of_another_run_is_refused(trained, tmp_path):
    import shutil

    from levyattn.data.tokenization import ByteTokenizer
    from levyattn.training.tasks.tokenized import TOKENIZER_NAME

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    ByteTokenizer().save(run / TOKENIZER_NAME)  # 256 bytes and the specials, not the run's pieces
    with pytest.raises(ValueError, match=r"\(vocab_size 260\) does not match the model \(vocab_size"):
        load_model_with_tokenizer(run, "lm")


def test_sweep_reports_perplexity_as_perplexity(tmp_path):
    # The sweep once labelled every task's metric "accuracy" and ranked it as one: an LM sweep
    # showed perplexities in an "accuracy" column. Lower perplexity is the better model.
    import json

    from levyattn.training.sweep import run_sweep

    root = trained_files(tmp_path)
    preset = tiny_preset(root / "train.txt", root / "valid.txt", epochs=1)
    out = tmp_path / "sweep"
    res = run_sweep(preset, alphas=[1.2], attentions=["fna", "softmax"], seeds=[0, 1], out_dir=out, gap_samples=4)
    assert res.metric == "ppl" and not res.higher_is_better
    assert all("accuracy" not in r and r["ppl"] > 1.0 for r in res.runs)
    assert "| ppl (lower is better) |" in res.table() and "accuracy" not in res.table()
    data = json.loads((out / "results.json").read_text())
    assert data["metric"] == "ppl" and "ppl_mean" in data["summary"][0]
    (comparison,) = data["comparisons"]
    ppl = {(r["attention"], r["seed"]): r["ppl"] for r in res.runs}
    lower = sum(ppl["fna", s] < ppl["softmax", s] for s in (0, 1))
    assert comparison["wins"] == lower and comparison["losses"] == 2 - lower  # ahead means lower here
    assert "ppl, paired by seed:" in res.table()
    # a run stored under the old key keeps its value as the task's metric
    stored_file = out / "runs" / "fna-a1.2-s0" / "result.json"
    stored = json.loads(stored_file.read_text())
    stored["row"]["accuracy"] = stored["row"].pop("ppl")
    stored_file.write_text(json.dumps(stored))
    again = run_sweep(preset, alphas=[1.2], attentions=["fna", "softmax"], seeds=[0, 1], out_dir=out, gap_samples=4)
    assert len(again.skipped) == 4
    assert [r["ppl"] for r in again.runs] == [r["ppl"] for r in res.runs]
    # the gap was measured on the causal self-attention, as analyze --preset-data reads it
    from levyattn.training.inputs import checkpoint_attention

    weights, valid, source = checkpoint_attention(out / "runs" / "fna-a1.2-s0", preset_data=3)
    assert valid is None and set(weights) == {"layer0"} and weights["layer0"].shape == (3, 2, 16, 16)
    w = weights["layer0"]
    assert abs(np.triu(w, 1)).max() == 0.0 and abs(w.sum(-1) - 1.0).max() < 1e-6  # causal rows
    assert source["metrics"]["ppl"] > 1.0


def trained_files(root):
    (root / "train.txt").write_text("".join(line + "\n" for line in LINES * 12), encoding="utf-8")
    (root / "valid.txt").write_text("".join(line + "\n" for line in LINES * 2), encoding="utf-8")
    return root



def test_a_sample_runs_past_eos_unless_told_to_stop():
    """Samples were cut at their first EOS whether or not stop_at_eos was set (4 samples of
    40 tokens: 104 new tokens reported and the same texts either way); now only with it."""
    from levyattn.data.tokenization import ByteTokenizer
    from levyattn.models.lm import CausalLM, CausalLMConfig

    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = CausalLM(CausalLMConfig(vocab_size=260, d_model=16, num_heads=2, num_layers=1, block_size=64)).eval()

    def likely_eos(module, inputs, logits):
        logits[..., tok.eos_id] += 3.0
        return logits

    model.lm_head.register_forward_hook(likely_eos)
    kwargs = dict(max_new_tokens=40, temperature=1.0, seed=3, num_samples=4)
    running, n_running = generate_text(model, tok, "hello", **kwargs)
    stopped, n_stopped = generate_text(model, tok, "hello", stop_at_eos=True, **kwargs)
    assert n_running == 4 * 40 and n_stopped < n_running
    for long, short in zip(running, stopped):
        assert long.startswith(short)
    assert running != stopped
