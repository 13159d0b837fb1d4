"""levyattn.training.inputs: a model's inputs read from files, and a checkpoint's attention on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from levyattn.models import TextClassifier, TextClassifierConfig
from levyattn.training.checkpoint import save_checkpoint
from levyattn.training.inputs import (
    checkpoint_attention,
    load_images,
    load_input_tensor,
    load_token_ids,
    valid_from_lengths,
)

IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors"])
def test_every_tensor_format_reads_with_its_dtype(tmp_path, suffix):
    path = tmp_path / f"ids{suffix}"
    if suffix == ".npy":
        np.save(path, IDS.numpy())
    elif suffix == ".npz":
        np.savez(path, input_ids=IDS.numpy())
    elif suffix == ".pt":
        torch.save([IDS], path)  # a one-element list is its element
    else:
        save_file({"input_ids": IDS}, str(path))
    got = load_input_tensor(path)
    assert got.dtype == torch.int64 and torch.equal(got, IDS)


def test_several_entries_need_a_key_unless_one_is_preferred(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"a": IDS, "b": IDS + 1, "input_ids": IDS + 2}, path)
    with pytest.raises(ValueError, match=r"two.pt holds several entries \['a', 'b', 'input_ids'\]"):
        load_input_tensor(path)
    assert torch.equal(load_input_tensor(path, prefer=("input_ids",)), IDS + 2)
    assert torch.equal(load_input_tensor(path, "b"), IDS + 1)
    with pytest.raises(ValueError, match="no entry key='c'"):
        load_input_tensor(path, "c")
    torch.save({"a": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt holds a list, not a tensor"):
        load_input_tensor(tmp_path / "list.pt")


def test_token_ids_from_text_files_are_padded_and_masked(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3\n\n4, 5\n")
    ids, padding = load_token_ids(path, vocab_size=10, max_len=8)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padding.tolist() == [[False, False, False], [False, False, True]]
    path.write_text("1 2\n3 4\n")
    assert load_token_ids(path, vocab_size=10, max_len=8)[1] is None  # nothing is padding


def test_token_id_errors_name_the_file_and_the_rule(tmp_path):
    (tmp_path / "bad.txt").write_text("1 2\n3 x\n")
    with pytest.raises(ValueError, match="bad.txt, line 2: expected integers"):
        load_token_ids(tmp_path / "bad.txt", 10, None)
    np.save(tmp_path / "f.npy", np.zeros((1, 3)))
    with pytest.raises(ValueError, match="f.npy: token ids must be integers, got dtype torch.float64"):
        load_token_ids(tmp_path / "f.npy", 10, None)
    np.save(tmp_path / "big.npy", np.array([3, 10]))
    with pytest.raises(ValueError, match=r"big.npy: token ids must lie in \[0, 10\), got \[3, 10\]"):
        load_token_ids(tmp_path / "big.npy", 10, None)
    with pytest.raises(ValueError, match="length must be <= 1 for this model, got 2"):
        load_token_ids(tmp_path / "big.npy", 11, 1)
    np.save(tmp_path / "cube.npy", np.zeros((1, 2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"must be \(L,\) or \(B, L\), got shape \(1, 2, 3\)"):
        load_token_ids(tmp_path / "cube.npy", 10, None)
    with pytest.raises(FileNotFoundError, match="some words: no such file"):
        load_token_ids("some words", 10, None)  # text needs a tokenizer


def test_images_take_three_shapes_and_refuse_others(tmp_path):
    torch.save(torch.rand(8, 8, dtype=torch.float64), tmp_path / "hw.pt")
    x = load_images(tmp_path / "hw.pt", None, channels=1, size=8)
    assert x.shape == (1, 1, 8, 8) and x.dtype == torch.float32
    torch.save({"images": torch.rand(3, 8, 8)}, tmp_path / "chw.pt")
    assert load_images(tmp_path / "chw.pt", None, channels=3, size=8).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"images must be \(B, 1, 8, 8\) or \(C, H, W\), got shape \(1, 3, 8, 8\)"):
        load_images(tmp_path / "chw.pt", None, channels=1, size=8)
    torch.save(torch.ones(1, 8, 8, dtype=torch.bool), tmp_path / "bool.pt")
    with pytest.raises(ValueError, match="real numbers"):
        load_images(tmp_path / "bool.pt", None, channels=1, size=8)


def test_valid_from_lengths():
    assert valid_from_lengths([2, 3], 2, 4).tolist() == [[True, True, False, False], [True, True, True, False]]
    assert valid_from_lengths([1], 2, 2).tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match=r"lengths needs 1 or B = 2 values, got \[1, 2, 3\]"):
        valid_from_lengths([1, 2, 3], 2, 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, N = 4\], got \[0, 2\]"):
        valid_from_lengths([0, 2], 2, 4)


@pytest.fixture
def classifier_run(tmp_path):
    torch.manual_seed(0)
    config = TextClassifierConfig(vocab_size=12, d_model=8, num_heads=2, num_layers=2, max_len=8, dropout=0.0)
    model = TextClassifier(config).eval()
    run = save_checkpoint(tmp_path / "run", model=model, model_type="text_classifier", model_config=config.to_dict())
    return run, model


def test_checkpoint_attention_is_the_models_own_with_the_padding_given(classifier_run, tmp_path):
    run, model = classifier_run
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    np.save(tmp_path / "ids.npy", ids.numpy())
    tensors, valid, source = checkpoint_attention(run, inputs=tmp_path / "ids.npy", lengths=[5, 3])
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        out = model(ids, key_padding_mask=padding, output_attentions=True)
    assert sorted(tensors) == ["layer0", "layer1"]
    for i, w in enumerate(out.attentions):
        np.testing.assert_allclose(tensors[f"layer{i}"], w.double().numpy(), rtol=0, atol=0)
    assert valid.tolist() == (~padding).tolist()
    assert source["predictions"] == out.logits.argmax(-1).tolist()
    assert (source["model_type"], source["batch"], source["length"]) == ("text_classifier", 2, 5)


def test_checkpoint_attention_bad_calls(classifier_run, tmp_path):
    run, _ = classifier_run
    with pytest.raises(ValueError, match="exactly one of inputs and preset_data"):
        checkpoint_attention(run)
    with pytest.raises(ValueError, match="exactly one of inputs and preset_data"):
        checkpoint_attention(run, inputs="x.npy", preset_data=2)
    with pytest.raises(ValueError, match="preset_data must be a positive number of test examples, got 0"):
        checkpoint_attention(run, preset_data=0)
