"""Every task checks its preset the same way (levyattn.training.tasks.base.PresetTask)."""

from __future__ import annotations

import copy

import pytest

from levyattn.training.presets import get_preset
from levyattn.training.tasks import make_task

PRESETS = ["digits-vit", "toy-translation-fna", "lm-toy-fna"]


def _with(name: str, section: str | None, key: str, value) -> dict:
    preset = copy.deepcopy(get_preset(name))
    (preset[section] if section else preset)[key] = value
    return preset


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_copied_and_read(name):
    preset = get_preset(name)
    task = make_task(preset)
    assert task.preset == preset and task.preset is not preset
    assert task.dataset == preset["data"]["dataset"] and task.model_type == preset["model_type"]
    preset["data"]["dataset"] = "changed"
    assert task.data_cfg["dataset"] != "changed"


@pytest.mark.parametrize("name", PRESETS)
def test_unknown_dataset_is_refused(name):
    with pytest.raises(ValueError, match=r"data\.dataset must be one of .*got 'nope'"):
        make_task(_with(name, "data", "dataset", "nope"))


@pytest.mark.parametrize(("name", "model_type"), [("toy-translation-fna", "'seq2seq'"), ("lm-toy-fna", "'lm'")])
def test_wrong_model_type_is_refused(name, model_type):
    with pytest.raises(ValueError, match=f"task needs model_type {model_type}, got 'vit'"):
        make_task(_with(name, None, "model_type", "vit"))


@pytest.mark.parametrize(("name", "key"), [("toy-translation-fna", "beam_size"), ("lm-toy-fna", "block_size")])
@pytest.mark.parametrize("value", [0, 2.5, True])
def test_counts_must_be_positive_integers(name, key, value):
    with pytest.raises(ValueError, match=rf"data\.{key} must be an integer >= 1, got {value!r}"):
        make_task(_with(name, "data", key, value))
