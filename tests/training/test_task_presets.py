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


def _data_keys_read(module) -> set[str]:
    """The ``data`` settings a module's source reads: string keys looked up (``x.get("k")``,
    ``x["k"]``, ``"k" in x``, and each key of a literal tuple a loop or comprehension looks up)
    on ``self.data_cfg``, on ``preset["data"]``, or on a local name bound to either."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))

    def is_data(node, local: set[str]) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr == "data_cfg")
                or (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                    and node.slice.value == "data")
                or (isinstance(node, ast.Name) and node.id in local))

    keys: set[str] = set()
    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        local = {t.id for n in ast.walk(func) if isinstance(n, ast.Assign) and is_data(n.value, set())
                 for t in n.targets if isinstance(t, ast.Name)}
        loops = {}  # loop variable -> the literal tuple of keys it runs over
        for n in ast.walk(func):
            if isinstance(n, ast.For | ast.comprehension) and isinstance(n.iter, ast.Tuple) \
                    and isinstance(n.target, ast.Name):
                loops[n.target.id] = [e.value for e in n.iter.elts if isinstance(e, ast.Constant)]
        for n in ast.walk(func):
            looked_up = None
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" \
                    and is_data(n.func.value, local) and n.args:
                looked_up = n.args[0]
            elif isinstance(n, ast.Subscript) and is_data(n.value, local):
                looked_up = n.slice
            elif isinstance(n, ast.Compare) and isinstance(n.ops[0], ast.In) and is_data(n.comparators[0], local):
                looked_up = n.left
            if isinstance(looked_up, ast.Constant) and isinstance(looked_up.value, str):
                keys.add(looked_up.value)
            elif isinstance(looked_up, ast.Name) and looked_up.id in loops:
                keys.update(loops[looked_up.id])
    return keys


@pytest.mark.parametrize("task", ["classification", "lm", "translation"])
def test_data_keys_list_every_data_setting_the_task_reads(task):
    from levyattn.training.tasks import base, task_module, tokenized

    module = task_module(task)
    read = _data_keys_read(module) | _data_keys_read(base) | _data_keys_read(tokenized)
    assert {"dataset", "vocab_size"} <= read  # the scan finds what it looks for
    cls = type(make_task(get_preset({"classification": "digits-vit", "lm": "lm-toy-fna",
                                     "translation": "toy-translation-fna"}[task])))
    assert cls.data_keys == module.DATA_KEYS
    assert read | set(cls.count_keys) == set(module.DATA_KEYS), sorted(read ^ set(module.DATA_KEYS))


@pytest.mark.parametrize(("name", "key", "value"), [
    ("lm-toy-fna", "block_size", 32), ("lm-toy-fna", "limit_eval", 3), ("lm-toy-fna", "tokenizer", "byte"),
    ("toy-translation-fna", "max_decode_len", 20), ("toy-translation-fna", "length_penalty", 0.6),
    ("toy-translation-fna", "src_lang", "de"), ("digits-vit", "max_len", 16), ("digits-vit", "limit_test", 8),
])
def test_a_bare_data_key_the_preset_leaves_out_goes_to_data(name, key, value):
    from levyattn.training.presets import apply_overrides

    preset = get_preset(name)
    preset["data"].pop(key, None)
    out = apply_overrides(preset, [f"{key}={value}"])
    assert out["data"][key] == value and key not in out["model"]


@pytest.mark.parametrize("name", PRESETS)
def test_unknown_data_setting_is_refused(name):
    with pytest.raises(ValueError, match=r"unknown data settings \['limt_train'\].*valid: \["):
        make_task(_with(name, "data", "limt_train", 5))
