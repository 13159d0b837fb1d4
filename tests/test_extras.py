"""Optional dependencies are checked before work starts, and a missing one is named with its extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from levyattn._extras import EXTRA_MODULES, MissingExtraError, missing_modules, require, require_all
from levyattn.training.presets import apply_overrides, get_preset
from levyattn.training.tasks import preset_requirements

SRC = Path(__file__).resolve().parents[1] / "src"


def test_require_names_the_missing_module_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # as if not installed
    assert missing_modules("sacrebleu", "torch") == ["sacrebleu"]
    expected = r"BLEU needs sacrebleu, not installed: pip install 'levyattn\[translate\]'"
    with pytest.raises(MissingExtraError, match=expected):
        require("translate", "sacrebleu", purpose="BLEU")
    require("translate", "sentencepiece", purpose="a tokenizer")  # installed: nothing raised


def test_require_all_names_every_missing_extra_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError) as info:
        require_all({"translate": ("sacrebleu",), "train": ("sklearn", "safetensors")}, purpose="x")
    assert str(info.value) == "x needs sacrebleu, sklearn, not installed: pip install 'levyattn[translate,train]'"


def test_an_unknown_extra_is_a_value_error():
    with pytest.raises(ValueError, match="extras must be among .*'nope'"):
        require("nope", purpose="x")


def test_the_extras_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras)


@pytest.mark.parametrize(
    "preset, overrides, expected",
    [
        ("toy-translation-fna", [], {"train": ("safetensors",), "translate": ("sacrebleu",)}),
        ("multi30k-fna-small", [], {"train": ("safetensors",), "translate": ("sacrebleu", "sentencepiece")}),
        ("lm-toy-fna", [], {"train": ("safetensors",), "translate": ("sentencepiece",)}),
        ("lm-toy-fna", ["data.tokenizer=byte"], {"train": ("safetensors",)}),
        ("digits-vit", [], {"train": ("safetensors", "sklearn")}),
    ],
)
def test_presets_declare_what_their_settings_need(preset, overrides, expected):
    assert preset_requirements(apply_overrides(get_preset(preset), overrides)) == expected


def _cli_without(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``levyattn ARGV`` in a subprocess where ``module`` cannot be imported."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; from levyattn.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(
    "module, extra, argv",
    [
        ("sacrebleu", "translate", ["train", "--preset", "toy-translation-fna", "--set", "epochs=1"]),
        ("sentencepiece", "translate", ["train", "--preset", "lm-toy-fna", "--set", "epochs=1"]),
        ("sacrebleu", "translate", ["sweep", "--preset", "toy-translation-fna", "--alphas", "1.2"]),
        ("sklearn", "train", ["demo", "--quick"]),
        ("transformers", "hf", ["lens", "some-model", "--no-hub"]),
        ("matplotlib", "report", ["lens", "some-model", "--no-hub"]),
    ],
)
def test_the_cli_says_which_extra_to_install_before_it_starts(tmp_path, module, extra, argv):
    result = _cli_without(module, *argv, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and module in lines[0] and f"pip install 'levyattn[{extra}]'" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # no run, sweep, demo or lens folder
