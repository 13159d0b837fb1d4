"""A trained model's inputs read from files, and the attention the model computes on them.

What each model type takes (``levyattn analyze RUN --input DATA`` documents the same):

- ``text_classifier``: token ids, from a tensor file (.npy/.npz/.pt/.pth/.safetensors, integer
  (L,) or (B, L)) or a ``.txt`` file of integers (one sequence per line, separated by spaces
  or commas; shorter lines are right-padded and masked). Ids in [0, vocab_size).
- ``lm``: token ids as above, or a text string encoded with the tokenizer saved in the run folder.
- ``seq2seq``: source token ids or a source sentence, likewise; the encoder's self-attention is
  what :func:`checkpoint_attention` returns (layers ``encoder0``, ...).
- ``vit``: images, a float tensor file (B, C, H, W), (C, H, W), or (H, W) for one-channel models.

Masks follow the models: ``padding`` masks are True at padding; the ``valid`` masks returned
for the analysis are True at real tokens (a class token at position 0 counts as real).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from levyattn.io import read_lines, read_tensor_file

__all__ = ["checkpoint_attention", "load_images", "load_input_tensor", "load_token_ids", "valid_from_lengths"]

MODEL_TYPES = ("text_classifier", "lm", "seq2seq", "vit")


def load_input_tensor(path: str | Path, key: str | None = None, prefer: tuple[str, ...] = ()) -> torch.Tensor:
    """One tensor from a .npy/.npz/.pt/.pth/.safetensors file (dtype kept).

    A file with several entries needs ``key`` unless it holds exactly one entry or one named
    in ``prefer`` (e.g. ``input_ids``); a one-element list or tuple is its element.
    """
    path = Path(path)
    obj = read_tensor_file(path, "input file")
    if isinstance(obj, (list, tuple)) and len(obj) == 1:
        obj = obj[0]
    if isinstance(obj, dict):
        if key is not None:
            if key not in obj:
                raise ValueError(f"input file {path} has no entry key={key!r}; it has {sorted(obj)}")
            obj = obj[key]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            hits = [k for k in prefer if k in obj]
            if not hits:
                raise ValueError(f"input file {path} holds several entries {sorted(obj)}; name the one to use (key)")
            obj = obj[hits[0]]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"input file {path} holds a {type(obj).__name__}, not a tensor")
    return obj


def _ids_from_text_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = []
    for lineno, line in enumerate(read_lines(path, "token-id file", allow_empty_lines=True), 1):
        if not line.strip():
            continue
        try:
            rows.append([int(v) for v in line.replace(",", " ").split()])
        except ValueError:
            raise ValueError(f"token-id file {path}, line {lineno}: expected integers, got {line!r}") from None
    if not rows:
        raise ValueError(f"token-id file {path} holds no token ids")
    length = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    padding = torch.ones((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        padding[i, : len(r)] = False
    return ids, (padding if padding.any() else None)


def load_token_ids(
    source: str | Path,
    vocab_size: int,
    max_len: int | None,
    key: str | None = None,
    tokenizer_dir: Path | None = None,
    text_ends_with_eos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids for a sequence model: ((B, L) long ids, (B, L) bool padding mask, True = padding, or None).

    ``source`` is a tensor file (``key`` as for :func:`load_input_tensor`), a ``.txt`` file of
    integers (one sequence per line; ragged lines are right-padded with 0 and masked), or --
    when ``tokenizer_dir`` is given and ``source`` is not a file -- a text string encoded with
    the tokenizer saved there, followed by its EOS with ``text_ends_with_eos`` (a translation
    model's source ends with EOS in training and translation). Ids must lie in [0, vocab_size)
    and L be at most ``max_len``.
    """
    path = Path(source)
    padding = None
    if path.is_file() and path.suffix.lower() == ".txt":
        ids, padding = _ids_from_text_file(path)
    elif path.is_file():
        ids = load_input_tensor(path, key, prefer=("input_ids", "src_ids", "ids"))
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{path}: token ids must be integers, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"{path}: token ids must be (L,) or (B, L), got shape {tuple(ids.shape)}")
        ids = ids.long()
    elif tokenizer_dir is not None:
        from levyattn.training.tasks.tokenized import load_tokenizer_beside

        tokenizer = load_tokenizer_beside(tokenizer_dir)
        tokens = tokenizer.encode(str(source))
        if not tokens:
            raise ValueError(f"text {str(source)!r} encodes to no tokens")
        if text_ends_with_eos:
            tokens.append(int(tokenizer.eos_id))
        ids = torch.tensor([tokens], dtype=torch.long)
    else:
        raise FileNotFoundError(
            f"{source}: no such file (this model type takes a token-id file: .npy/.npz/.pt/.pth/.safetensors/.txt)"
        )
    if ids.numel() == 0:
        raise ValueError(f"{source} holds no tokens")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"{source}: token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{source}: sequence length must be <= {max_len} for this model, got {ids.shape[1]}")
    return ids, padding


def load_images(source: str | Path, key: str | None, channels: int, size: int) -> torch.Tensor:
    """(B, C, H, W) float32 images from a tensor file; (C, H, W) and, for C = 1, (H, W) accepted.

    ``key`` as for :func:`load_input_tensor` (``images`` and ``pixel_values`` are found unnamed).
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such file (a ViT takes an image tensor file)")
    x = load_input_tensor(path, key, prefer=("images", "pixel_values"))
    if x.dim() == 2 and channels == 1:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    expected = (channels, size, size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{path}: images must be (B, {channels}, {size}, {size}) or (C, H, W), got shape {tuple(x.shape)}"
        )
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{path}: images must be real numbers, got dtype {x.dtype}")
    return x.to(torch.float32)


def valid_from_lengths(lengths: Sequence[int], batch: int, length: int) -> torch.Tensor:
    """(batch, length) bool, True at the first ``lengths[b]`` positions of each sequence.

    ``lengths`` holds one value for every sequence or one per sequence (``batch`` values),
    each in [1, length].
    """
    values = torch.as_tensor(list(lengths), dtype=torch.long)
    if values.dim() != 1 or len(values) not in (1, batch):
        raise ValueError(f"lengths needs 1 or B = {batch} values, got {list(lengths)}")
    if (values < 1).any() or (values > length).any():
        raise ValueError(f"lengths must lie in [1, N = {length}], got {list(lengths)}")
    return (torch.arange(length)[None, :] < values[:, None]).expand(batch, -1)


def checkpoint_attention(
    run: str | Path,
    *,
    inputs: str | Path | None = None,
    preset_data: int | None = None,
    input_key: str | None = None,
    lengths: Sequence[int] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, Any]]:
    """Run a levyattn checkpoint's model in eval mode on ``inputs`` or its own test data; return its attention.

    Args:
        run: a run folder written by the trainer, or its ``checkpoint.json``.
        inputs: the model's input (see the module docstring): a file, or for LM / seq2seq runs a text string.
        preset_data: instead of ``inputs``, the first N test examples of the task the run was trained on
            (every task: classification, the LM's causal self-attention, translation's encoder
            self-attention); the source then holds the model's metrics on them.
        input_key: the entry of an ``inputs`` tensor file with several entries.
        lengths: valid tokens per sequence of token-id ``inputs`` (one value or one per sequence); the
            rest is padding. The model's ``pad_id`` marks padding as well.

    Returns:
        ({layer name: (B, H, L, L) float64 array}, valid mask (B, L) bool or None, a JSON-able
        description of the source: checkpoint, model type, step, inputs, predictions or metrics).
        Layers are ``layer0``, ... (``encoder0``, ... for seq2seq); models that average heads give H = 1.
    """
    from levyattn.training.checkpoint import load_checkpoint, model_from_checkpoint

    if (inputs is None) == (preset_data is None):
        raise ValueError(f"{run} is a checkpoint: give exactly one of inputs and preset_data (what to run it on)")
    ckpt = load_checkpoint(run)
    model = model_from_checkpoint(ckpt).eval()
    source: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "model_type": ckpt.model_type,
        "global_step": ckpt.state.get("position", {}).get("global_step"),
    }
    valid = None
    with torch.no_grad():
        if preset_data is not None:
            weights, valid = _preset_data_attention(ckpt, model, preset_data, source)
            if ckpt.model_type == "seq2seq":  # the task gives the encoder's self-attention
                weights = {f"encoder{i}": w for i, w in enumerate(weights)}
        else:
            positional, padding_masks = _model_inputs(ckpt, model.config, inputs, input_key, lengths, source)
            out = model(*positional, output_attentions=True, **padding_masks)
            if ckpt.model_type == "seq2seq":  # the encoder's self-attention
                weights = {f"encoder{i}": w for i, w in enumerate(out.encoder_attentions)}
            else:
                weights = out.attentions
            if ckpt.model_type in ("text_classifier", "vit"):
                source["predictions"] = out.logits.argmax(-1).tolist()
            if padding_masks:
                valid = ~next(iter(padding_masks.values()))
    if not isinstance(weights, dict):
        weights = {f"layer{i}": w for i, w in enumerate(weights)}
    tensors = {}
    for name, w in weights.items():
        w = w.detach().to("cpu", torch.float64)
        if w.dim() == 3:  # heads averaged
            w = w.unsqueeze(1)
        tensors[name] = w.numpy()
    if not tensors:
        raise ValueError(f"checkpoint {ckpt.path}: the model returned no attention weights")
    if valid is not None:
        valid = valid.cpu().numpy().astype(bool)
        n = next(iter(tensors.values())).shape[-1]
        if valid.shape[-1] == n - 1:  # a class token at position 0 is always valid
            valid = np.pad(valid, ((0, 0), (1, 0)), constant_values=True)
    return tensors, valid, source


def _model_inputs(
    ckpt: Any,
    cfg: Any,
    inputs: str | Path,
    input_key: str | None,
    lengths: Sequence[int] | None,
    source: dict[str, Any],
) -> tuple[tuple, dict]:
    """``inputs`` as the checkpoint's model takes them: (positional inputs, padding masks by
    keyword, empty when nothing is padding); ``source`` records what was read."""
    if ckpt.model_type == "vit":
        images = load_images(inputs, input_key, cfg.in_channels, cfg.image_size)
        source.update(input=str(inputs), batch=int(images.shape[0]))
        return (images,), {}
    if ckpt.model_type not in MODEL_TYPES:
        raise ValueError(f"checkpoint {ckpt.path}: model type {ckpt.model_type!r} is not one of {MODEL_TYPES}")
    vocab = cfg.src_vocab_size if ckpt.model_type == "seq2seq" else cfg.vocab_size
    max_len = cfg.block_size if ckpt.model_type == "lm" else cfg.max_len
    tokenizer_dir = ckpt.path if ckpt.model_type in ("lm", "seq2seq") else None
    ids, padding = load_token_ids(inputs, vocab, max_len, input_key, tokenizer_dir,
                                  text_ends_with_eos=ckpt.model_type == "seq2seq")
    if lengths is not None:
        given = ~valid_from_lengths(lengths, ids.shape[0], ids.shape[1])
        padding = given if padding is None else padding | given
    if padding is None and getattr(cfg, "pad_id", None) is not None:
        padding = ids == cfg.pad_id
        padding = padding if padding.any() else None
    source.update(input=str(inputs), batch=int(ids.shape[0]), length=int(ids.shape[1]))
    if ckpt.model_type == "seq2seq":
        # The encoder's attention does not depend on the target: a lone BOS is enough.
        bos = torch.full((ids.shape[0], 1), cfg.bos_id, dtype=torch.long)
        return (ids, bos), ({} if padding is None else {"src_key_padding_mask": padding})
    return (ids,), ({} if padding is None else {"key_padding_mask": padding})


def _preset_data_attention(ckpt: Any, model: Any, n: int, source: dict[str, Any]) -> tuple[list, Any]:
    from levyattn.training.presets import preset_from_run
    from levyattn.training.tasks import make_task

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"preset_data must be a positive number of test examples, got {n!r}")
    task = make_task(preset_from_run(ckpt.path))
    if not callable(getattr(task, "attention", None)):
        raise ValueError(
            f"preset_data: the {task.name!r} task of {ckpt.path} has no attention(model, batch) method "
            "(the built-in tasks do); give inputs instead"
        )
    _, test = task.datasets()
    n = min(n, len(test))
    batch = task.collate([test[i] for i in range(n)])
    weights, valid = task.attention(model, batch)
    source.update(preset_data=n, metrics=task.evaluate(model, [batch]))
    return weights, valid
