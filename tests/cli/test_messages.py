"""What a newcomer reads: "did you mean" for misspelled names, an aligned preset list, no repeated warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from levyattn.training.presets import all_presets

SRC = Path(__file__).resolve().parents[2] / "src"


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "levyattn", *argv], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("argv, hint", [
    (["trian", "--list"], "did you mean 'train'?"),
    (["train", "--preset", "digits-vt"], "did you mean 'digits-vit'?"),
    (["sweep", "--preset", "multiscale-1layr"], "did you mean 'multiscale-1layer'?"),
    (["train", "--preset", "digits-vit", "--device", "cuad"], "did you mean 'cuda'?"),
    (["lens", "m", "--protocol", "dens"], "did you mean 'dense'?"),
])
def test_a_misspelled_name_gets_a_suggestion(argv, hint):
    result = _cli(*argv)
    assert result.returncode == 2 and hint in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_preset_list_is_aligned():
    lines = _cli("train", "--list").stdout.splitlines()
    presets = all_presets()
    assert len(lines) == len(presets)
    column = max(map(len, presets)) + 2
    for line in lines:
        name = line[:column].rstrip()
        assert name in presets and line[column:] == presets[name]["description"], line


def test_library_names_get_suggestions_too():
    from levyattn.data._common import check_choice
    from levyattn.models import build_model

    with pytest.raises(ValueError, match="unknown model_type 'vt'; did you mean 'vit'"):
        build_model("vt", {})
    with pytest.raises(ValueError, match="unknown ViTConfig field.*'aplha'.*did you mean 'alpha'"):
        build_model("vit", {"aplha": 1.2})
    with pytest.raises(ValueError, match="did you mean 'bpe'"):
        check_choice("kind", "bep", ("sentencepiece", "bpe", "word", "byte"))
    with pytest.raises(ValueError, match=r"got 'xyz'$"):  # nothing close: no suggestion
        check_choice("kind", "xyz", ("sentencepiece", "bpe", "word", "byte"))


def test_tokenised_toy_text_scores_without_sacrebleu_warnings(caplog):
    """The toy grammar's sentences end in " ." (hypotheses and references alike): its BLEU is
    computed without sacrebleu's "tokenized period" warning, which it would print every epoch."""
    from levyattn.data.translation import make_toy_translation
    from levyattn.metrics import translation_scores

    refs = [tgt for _, tgt in make_toy_translation(120, 0)]
    hyps = [" ".join(r.split()[1:]) for r in refs]
    with caplog.at_level(logging.WARNING, logger="sacrebleu"):
        warned = translation_scores(hyps, refs)
    assert any("tokenized period" in r.getMessage() for r in caplog.records)  # what sacrebleu does by default
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sacrebleu"):
        quiet = translation_scores(hyps, refs, tokenized=True)
    assert caplog.records == [] and quiet == warned


def test_the_toy_translation_task_scores_its_text_as_tokenised(monkeypatch):
    import levyattn.metrics
    from levyattn.training.presets import apply_overrides, get_preset
    from levyattn.training.tasks import make_task

    seen = []
    real = levyattn.metrics.translation_scores

    def recording(hyps, refs, **kw):
        seen.append(kw)
        return real(hyps, refs, **kw)

    monkeypatch.setattr(levyattn.metrics, "translation_scores", recording)
    preset = apply_overrides(get_preset("toy-translation-fna"), [
        "data.toy.n_train=16", "data.toy.n_eval=4", "model.num_encoder_layers=1", "model.num_decoder_layers=1",
        "model.d_model=8", "model.dim_feedforward=8", "model.num_heads=1", "data.max_decode_len=3"])
    task = make_task(preset)
    _, evaluation = task.datasets()
    import torch

    loader = torch.utils.data.DataLoader(evaluation, batch_size=4, collate_fn=task.collate)
    with torch.no_grad():
        task.evaluate(task.build_model().eval(), loader)
    assert seen == [{"tokenized": True}]


def test_help_texts_name_real_options():
    """Every ``--option`` a subcommand's description or epilog names is an option of levyattn (its own,
    or another subcommand's that it quotes) or of torchrun, whose command line the train help shows."""
    import argparse
    import re

    from levyattn.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    known = {"--nproc_per_node"}.union(*(sub._option_string_actions for sub in subcommands.values()))
    for name, sub in subcommands.items():
        named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", f"{sub.description or ''} {sub.epilog or ''}"))
        assert named <= known, f"levyattn {name} --help names {sorted(named - known)}, which no command takes"


@pytest.mark.parametrize("argv, expected", [
    (["train", "--preset", "digits-vit", "--out", "{out}"], "no checkpoint was written in {out} yet"),
    (["train", "--resume", "{out}"], "continue it with: levyattn train --resume {out}"),
    (["sweep", "--preset", "digits-vit", "--out", "{out}"], "run the same command again to continue"),
])
def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch, capsys, argv, expected):
    # Ctrl-C in the middle of training: exit code 130 and one line on how to continue, not a traceback
    from levyattn import cli
    from levyattn.training import presets, sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(presets, "train_preset", interrupted)
    monkeypatch.setattr(sweep, "train_preset", interrupted)
    monkeypatch.setattr(presets, "preset_from_run", lambda run: presets.get_preset("digits-vit"))
    if "--resume" in argv:
        (tmp_path / "checkpoint.json").write_text("{}")
    argv = [a.replace("{out}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"levyattn {argv[0]}: interrupted; ") and expected.replace("{out}", str(tmp_path)) in err
