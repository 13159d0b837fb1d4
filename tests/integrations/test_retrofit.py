"""retrofit (levyattn convert) on a tiny random Llama: each stage does what it says, the result
saves and reloads as an FNA model, an interrupted run resumes to the same model, bad input is named."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hf_tiny import transformers

pytest.importorskip("peft")

from levyattn.cli import main  # noqa: E402
from levyattn.config import RetrofitOptions  # noqa: E402
from levyattn.integrations import hf_retrofit  # noqa: E402

VOCAB = 64
OPTIONS = RetrofitOptions(window=16, batch_size=4, calibration_windows=16, stage1_steps=60, stage1_lr=0.05, qk_rank=2,
                          stage2_steps=6, checkpoint_every=2, stage2_lr=3e-3)  # fmt: skip


def tiny_llama(seed: int = 0):
    # initializer_range 0.2 makes the random attention peaked, so FNA at its defaults is far from
    # it and stage 1 has something to win back.
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, OPTIONS.window), generator=torch.Generator().manual_seed(seed))


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer whose ids match the tiny model's specials (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrofit")
    model = tiny_llama()
    result = hf_retrofit.retrofit(model, windows(16, 0), windows(6, 1), out, OPTIONS, source="tiny")
    return model, result, out


def test_stage1_lowers_every_layers_error(converted):
    _, result, _ = converted
    assert len(result.layer_error_before) == len(result.layer_error_after) == 2
    for before, after in zip(result.layer_error_before, result.layer_error_after):
        assert after < 0.75 * before


def test_reported_perplexities_are_those_of_the_models(converted):
    model, result, out = converted
    assert all(math.isfinite(v) for v in result.perplexity.values())
    assert result.perplexity["stage2"] == pytest.approx(hf_retrofit.perplexity(model, windows(6, 1), 4), rel=1e-6)
    softmax = tiny_llama()
    assert result.perplexity["softmax"] == pytest.approx(hf_retrofit.perplexity(softmax, windows(6, 1), 4), rel=1e-6)
    report = json.loads((out / "retrofit" / "report.json").read_text())
    assert report["perplexity"] == pytest.approx(result.perplexity) and report["source"] == "tiny"
    assert set(report["cpu_seconds"]) >= {"to_fna", "stage1", "stage2", "evaluation"}
    table = result.format()
    assert "stage 2: LoRA fine-tune" in table and f"{result.perplexity['stage1']:.2f}" in table
    assert f"{result.perplexity['stage2'] / result.perplexity['softmax']:.2f}x softmax's" in table


def test_saved_model_reloads_as_fna_with_the_same_logits(converted):
    model, _, out = converted
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="fna").eval()
    ids = windows(3, 7)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert len(config["fna_bandwidth"]) == 2 and len(config["fna_bandwidth"][0]) == 4  # per layer, per head
    # the converted model is FNA: its logits are not the softmax model's
    assert not torch.allclose(logits(tiny_llama(), ids), logits(model, ids), atol=1e-3)


@pytest.mark.slow
def test_fit_alpha_moves_alpha_within_its_range(tmp_path):
    options = dataclasses.replace(OPTIONS, fit_alpha=True, stage1_lr=0.1, stage2_steps=0, qk_rank=0)
    model = tiny_llama()
    result = hf_retrofit.retrofit(model, windows(16, 0), windows(6, 1), tmp_path, options)
    alphas = torch.tensor(model.config.fna_alpha)
    assert alphas.shape == (2, 4) and bool(((alphas > 0) & (alphas < 2)).all())
    assert not torch.allclose(alphas, torch.full_like(alphas, options.alpha))
    assert result.perplexity["stage2"] is None and result.perplexity["stage1"] is not None


class Interrupt(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("where", ["stage1", "stage2"])
def test_interrupted_run_resumes_to_the_same_model(converted, tmp_path, monkeypatch, where):
    model, result, _ = converted
    if where == "stage1":
        original = hf_retrofit._fit_layer

        def fit_layer(model, layer, *args):
            if layer == 1:
                raise Interrupt
            return original(model, layer, *args)

        monkeypatch.setattr(hf_retrofit, "_fit_layer", fit_layer)
    else:
        original_update = hf_retrofit.EpochProgress.update

        def update(self, *args):
            original_update(self, *args)
            if self.unit == "stage 2: fine-tune" and self.step == 3:  # after the checkpoint at step 2
                raise Interrupt

        monkeypatch.setattr(hf_retrofit.EpochProgress, "update", update)
    with pytest.raises(Interrupt):
        hf_retrofit.retrofit(tiny_llama(), windows(16, 0), windows(6, 1), tmp_path, OPTIONS)
    monkeypatch.undo()
    state = json.loads((tmp_path / "retrofit" / "state.json").read_text())
    assert (state["layers_done"], state["stage2_step"]) == ((1, 0) if where == "stage1" else (2, 2))
    with pytest.raises(FileExistsError, match="resume"):
        hf_retrofit.retrofit(tiny_llama(), windows(16, 0), windows(6, 1), tmp_path, OPTIONS)
    resumed_model = tiny_llama()
    resumed = hf_retrofit.retrofit(resumed_model, windows(16, 0), windows(6, 1), tmp_path, OPTIONS, resume=True)
    assert resumed.perplexity == pytest.approx(result.perplexity, rel=1e-5)
    assert resumed.layer_error_after == pytest.approx(result.layer_error_after, rel=1e-5)
    ids = windows(3, 7)
    torch.testing.assert_close(logits(resumed_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_resume_with_other_options_is_refused(converted):
    _, _, out = converted
    with pytest.raises(ValueError, match="other options.*stage2_steps"):
        hf_retrofit.retrofit(
            tiny_llama(), windows(16, 0), windows(6, 1), out, dataclasses.replace(OPTIONS, stage2_steps=9), resume=True
        )



@pytest.mark.parametrize("train, held_out, named", [(17, 1, "train_windows"), (0, 2, "eval_windows")])
def test_resume_on_other_text_is_refused(converted, train, held_out, named):
    # Resumed without --eval-text, levyattn convert held out the last tenth of --text instead and
    # printed the first run's perplexities as if measured on those windows.
    _, _, out = converted
    with pytest.raises(ValueError, match=f"other {named}.*--eval-text"):
        hf_retrofit.retrofit(tiny_llama(), windows(16, train), windows(6, held_out), out, OPTIONS, resume=True)

@pytest.mark.parametrize(
    "field, value, match",
    [("alpha", 2.5, r"alpha.*\(0\.0, 2\.0\], got 2\.5"), ("window", 1, "window"), ("stage1_lr", -1.0, "stage1_lr"),
     ("qk_rank", -1, "qk_rank"), ("batch_size", 0, "batch_size"), ("lora_rank", 0, "lora_rank")],
)  # fmt: skip
def test_bad_options_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        RetrofitOptions(**{field: value})


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="train_windows.*int64"):
        hf_retrofit.retrofit(tiny_llama(), windows(4, 0).float(), windows(2, 1), tmp_path, OPTIONS)
    fna = tiny_llama()
    fna.set_attn_implementation("fna")
    with pytest.raises(ValueError, match="already uses attn_implementation='fna'"):
        hf_retrofit.retrofit(fna, windows(4, 0), windows(2, 1), tmp_path, OPTIONS)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf_retrofit.retrofit(torch.nn.Linear(2, 2), windows(4, 0), windows(2, 1), tmp_path, OPTIONS)


def test_text_windows_cut_and_short_text(tmp_path):
    tokenizer = word_tokenizer(list("abcdefg"))
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f g " * 5)
    ids = hf_retrofit.text_windows(tokenizer, [text, text], 8)
    # 2 x (35 tokens + EOS) = 72 tokens -> 9 windows; the EOS closes each file
    assert ids.shape == (9, 8) and ids.dtype == torch.long
    assert ids.flatten()[35] == 2 and ids.flatten()[:7].tolist() == [3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        hf_retrofit.text_windows(tokenizer, [text], 64)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        hf_retrofit.text_windows(tokenizer, [tmp_path / "missing.txt"], 8)


@pytest.mark.slow
def test_convert_cli_end_to_end(tmp_path, capsys):
    words = [f"w{i}" for i in range(VOCAB - 3)]
    tokenizer = word_tokenizer(words)
    source = tmp_path / "model"
    tiny_llama().save_pretrained(source)
    tokenizer.save_pretrained(source)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "train.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (400,), generator=g)))
    out = tmp_path / "out"
    rc = main(["convert", str(source), "--out", str(out), "--text", str(text), "--window", "16", "--batch-size", "4",
               "--stage1-steps", "5", "--qk-rank", "2", "--stage2-steps", "2"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    for word in ("softmax", "to_fna", "stage 1", "stage 2", "attn_implementation='fna'"):
        assert word in printed
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="fna")
    assert reloaded.config.fna_alpha is not None
    assert (out / "tokenizer.json").exists() and (out / "retrofit" / "report.json").exists()


def test_fine_tune_alone_is_stage2_on_a_softmax_model(tmp_path):
    """The controlled baseline: the same LoRA fine-tune on the softmax model, its attention kept."""
    options = dataclasses.replace(OPTIONS, stage2_steps=4)
    model = tiny_llama()
    before = hf_retrofit.perplexity(model, windows(16, 0), 4)
    hf_retrofit.fine_tune(model, windows(16, 0), tmp_path, options)
    assert model.config._attn_implementation == "sdpa"
    assert hf_retrofit.perplexity(model, windows(16, 0), 4) < before  # on its training windows
    with pytest.raises(FileExistsError, match="resume"):
        hf_retrofit.fine_tune(tiny_llama(), windows(16, 0), tmp_path, options)
    resumed = tiny_llama()
    hf_retrofit.fine_tune(resumed, windows(16, 0), tmp_path, options, resume=True)  # finished: only merges
    ids = windows(2, 7)
    torch.testing.assert_close(logits(resumed, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relative", [False, True])
def test_a_missing_model_folder_is_named(tmp_path, capsys, monkeypatch, relative):
    # It reached transformers as a hub id: an OSError traceback about repo id formats.
    monkeypatch.chdir(tmp_path)
    missing = "./models/missing" if relative else str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not found: " + missing):
        hf_retrofit.load_causal_lm(missing)
    text = tmp_path / "train.txt"
    text.write_text("w1 w2 w3")
    assert main(["convert", missing, "--out", str(tmp_path / "out"), "--text", str(text)]) == 2
    assert f"levyattn convert: error: model folder or file not found: {missing}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_draws_the_same_dropout_masks(tmp_path, monkeypatch):
    # With attention dropout the resumed model's logits differed by 0.32 from the uninterrupted one's:
    # the global torch generator, which draws the masks, was not checkpointed.
    options = dataclasses.replace(OPTIONS, stage1_steps=5)

    def with_dropout():
        model = tiny_llama()
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.2
        return model

    model = with_dropout()
    hf_retrofit.retrofit(model, windows(16, 0), windows(6, 1), tmp_path / "whole", options)
    original_update = hf_retrofit.EpochProgress.update

    def update(self, *args):
        original_update(self, *args)
        if self.unit == "stage 2: fine-tune" and self.step == 3:
            raise Interrupt

    monkeypatch.setattr(hf_retrofit.EpochProgress, "update", update)
    with pytest.raises(Interrupt):
        hf_retrofit.retrofit(with_dropout(), windows(16, 0), windows(6, 1), tmp_path / "parts", options)
    monkeypatch.undo()
    resumed = with_dropout()
    torch.manual_seed(123)  # the resuming process's generators are in another state
    hf_retrofit.retrofit(resumed, windows(16, 0), windows(6, 1), tmp_path / "parts", options, resume=True)
    ids = windows(3, 7)
    torch.testing.assert_close(logits(resumed, ids), logits(model, ids), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_run_interrupted_between_tensors_and_state_resumes_to_the_same_model(converted, tmp_path, monkeypatch):
    # Killed after stage 2's tensors of step 4 and before state.json said step 4, the resumed run
    # trained steps 3-4 again on the weights of step 4 (a 2-layer Llama ended 5.6e-4 off in its weights).
    model, result, _ = converted
    original_save_state = hf_retrofit._Checkpoints.save_state

    def save_state(self, state):
        if state["stage2_step"] == 4:
            raise Interrupt
        original_save_state(self, state)

    monkeypatch.setattr(hf_retrofit._Checkpoints, "save_state", save_state)
    with pytest.raises(Interrupt):
        hf_retrofit.retrofit(tiny_llama(), windows(16, 0), windows(6, 1), tmp_path, OPTIONS)
    monkeypatch.undo()
    resumed_model = tiny_llama()
    resumed = hf_retrofit.retrofit(resumed_model, windows(16, 0), windows(6, 1), tmp_path, OPTIONS, resume=True)
    assert resumed.perplexity == pytest.approx(result.perplexity, rel=1e-6)
    ids = windows(3, 7)
    torch.testing.assert_close(logits(resumed_model, ids), logits(model, ids), rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "retrofit").glob("*.safetensors")) == [
        "stage1-00000002.safetensors", "stage2-00000006.safetensors"]


def test_a_corrupt_checkpoint_file_is_named(converted, tmp_path):
    _, _, out = converted
    state = json.loads((out / "retrofit" / "state.json").read_text())
    folder = tmp_path / "retrofit"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps(state))
    (folder / state["stage1_file"]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    with pytest.raises(ValueError, match=f"retrofit checkpoint file {folder / state['stage1_file']} cannot be read"):
        hf_retrofit.retrofit(tiny_llama(), windows(16, 0), windows(6, 1), tmp_path, OPTIONS, resume=True)


def test_a_save_killed_halfway_leaves_the_saved_model_whole(converted, tmp_path, monkeypatch):
    # A finished conversion run again (--resume) and killed inside save_pretrained left OUT's
    # model.safetensors cut to half its bytes (unloadable) in place of the good one.
    import shutil

    import transformers.modeling_utils

    _, _, out = converted
    shutil.copytree(out, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    def half_then_killed(tensors, filename, metadata=None):
        transformers.modeling_utils.safe_save_file.__wrapped__(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(len(before) // 2)
        raise Interrupt

    half_then_killed.__wrapped__ = transformers.modeling_utils.safe_save_file
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_killed)
    with pytest.raises(Interrupt):
        hf_retrofit.retrofit(tiny_llama(), windows(16, 0), windows(6, 1), tmp_path / "out", OPTIONS, resume=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
