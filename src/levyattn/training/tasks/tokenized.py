"""What the tasks on tokenised text (language modelling, translation) share.

The tokeniser is trained when a task loads its data and saved beside the checkpoint
(:data:`TOKENIZER_NAME`), where inference finds it again; the toy corpus is
``levyattn.data.make_toy_translation`` under one convention for both tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from levyattn.training.tasks.base import PresetTask

TOKENIZER_NAME = "tokenizer.model"  # sentencepiece model file (load_tokenizer sniffs the format)


class TokenizedTask(PresetTask):
    """A :class:`PresetTask` whose ``_load()`` sets ``_data`` (the training and evaluation datasets)
    and ``tokenizer`` (trained on the training data); both are None until then."""

    def __init__(self, preset: dict[str, Any]) -> None:
        super().__init__(preset)
        self._data: tuple[Any, Any] | None = None
        self.tokenizer: Any = None

    def save_artifacts(self, out_dir: str | Path) -> Path:
        """Write the tokeniser into ``out_dir`` (beside the checkpoint); return its path."""
        self._load()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / TOKENIZER_NAME
        self.tokenizer.save(path)
        return path


def tokenizer_modules(kind: Any) -> tuple[str, ...]:
    """The modules a ``data.tokenizer`` of ``kind`` imports (the SentencePiece ones need sentencepiece)."""
    return ("sentencepiece",) if kind in ("sentencepiece", "bpe") else ()


def toy_pairs(toy: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, evaluation pairs) of the toy grammar for a preset's ``data.toy`` settings.

    ``n_train`` (default 3000), ``n_eval`` (200) and ``seed`` (0) are taken out; the rest are
    ``make_toy_translation``'s grammar settings. Held-out sentences come from another seed
    (``seed + 1_000_003``) of the same grammar, skipping those whose source sentence is a
    training one (a small grammar repeats sentences: with ``min_pp = max_pp = 0``, 146 of 200
    held-out sentences were training sentences); a grammar too small to give ``n_eval``
    unseen sentences is a ValueError.
    """
    from levyattn.data.translation import make_toy_translation

    toy = dict(toy)
    n_train, n_eval, seed = int(toy.pop("n_train", 3000)), int(toy.pop("n_eval", 200)), int(toy.pop("seed", 0))
    train = make_toy_translation(n_train, seed, **toy)
    seen = {src for src, _ in train}
    drawn, most = max(n_eval, 1), 64 * max(n_eval, 16)
    while True:  # the draws are prefix-stable: more of them only adds pairs at the end
        held_out = [pair for pair in make_toy_translation(drawn, seed + 1_000_003, **toy) if pair[0] not in seen]
        if len(held_out) >= n_eval:
            return train, held_out[:n_eval]
        if drawn >= most:
            raise ValueError(
                f"data.toy: n_eval={n_eval} held-out sentences unseen in training were asked for, but {drawn} draws "
                f"of the grammar {toy or '(defaults)'} gave {len(held_out)} beside its n_train={n_train} training "
                "sentences; lower n_eval or n_train, or widen the grammar (min_pp, max_pp, p_adj)"
            )
        drawn = min(2 * drawn, most)


def load_tokenizer_beside(run_dir: str | Path) -> Any:
    """The tokeniser saved beside a checkpoint by :meth:`TokenizedTask.save_artifacts`."""
    from levyattn.data.tokenization import load_tokenizer

    path = Path(run_dir) / TOKENIZER_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {path} does not exist (a translation or LM run folder keeps its "
            "tokenizer beside checkpoint.json)"
        )
    return load_tokenizer(path)


# The config field a tokenizer's vocab_size must equal, by model type.
_VOCAB_FIELD = {"lm": "vocab_size", "seq2seq": "tgt_vocab_size"}


def load_model_with_tokenizer(path: str | Path, model_type: str, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a run folder or its checkpoint.json, for
    ``model_type`` "lm" (a language model) or "seq2seq" (a translator).

    The tokenizer must match the model: its ``vocab_size`` equals the config's (the target's for
    seq2seq), and its special ids the config's ``pad_id`` / ``bos_id`` / ``eos_id`` where the
    config has them. A checkpoint of another model type raises CheckpointError (a ValueError)
    saying so.
    """
    if model_type not in _VOCAB_FIELD:
        raise ValueError(f"model_type must be one of {sorted(_VOCAB_FIELD)}, got {model_type!r}")
    vocab_field = _VOCAB_FIELD[model_type]
    from levyattn.training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, model_type)
    tokenizer = load_tokenizer_beside(ckpt.path)
    c = model.config
    ids = [name for name in ("pad_id", "bos_id", "eos_id") if hasattr(c, name)]
    if (tokenizer.vocab_size, *(getattr(tokenizer, n) for n in ids)) != (
        getattr(c, vocab_field), *(getattr(c, n) for n in ids)
    ):
        raise ValueError(
            f"the tokenizer in {ckpt.path} (vocab_size {tokenizer.vocab_size}) does not match the model "
            f"({vocab_field} {getattr(c, vocab_field)}); it belongs to another run"
        )
    return model.to(device).eval(), tokenizer
