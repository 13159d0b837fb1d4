"""Language modelling: a causal LM on contiguous token blocks of plain-text files.

Batches are ``(input_ids (B, L) long, targets (B, L) long)``: each training item is a
block of ``L + 1`` consecutive tokens of the tokenised corpus, split into input and
the same shifted left by one. The loss is the mean token cross-entropy (weight =
number of target tokens); ``evaluate`` reports ``loss`` (mean token NLL in nats) and
``ppl`` = exp(loss), the headline metric (lower is better).

A sentencepiece tokeniser is trained on the training text;
:meth:`LMTask.save_artifacts` writes it beside the checkpoint, where
``levyattn generate`` finds it.

``data`` settings of a preset:

- ``dataset``: "text" (``train_file`` and ``eval_file``, UTF-8 plain text) or "toy"
  (the target side of ``levyattn.data.make_toy_translation``, keyword arguments under
  ``toy``: a deterministic corpus anyone can regenerate);
- ``vocab_size`` (sentencepiece pieces), ``block_size`` (L, the training context),
  ``limit_train`` / ``limit_eval`` (at most N blocks).

The model config in a preset leaves out ``vocab_size`` and ``block_size``; the task
fills them in (``block_size`` of the model = the data's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from levyattn.io import read_text, split_lines
from levyattn.training.tasks.tokenized import TokenizedTask, tokenizer_modules, toy_pairs

DATASETS = ("text", "toy")
# Every data setting the task reads (the module docstring says what each does).
DATA_KEYS = ("dataset", "train_file", "eval_file", "toy", "tokenizer", "vocab_size", "block_size", "limit_train",
             "limit_eval")


class BlockDataset(torch.utils.data.Dataset):
    """Non-overlapping blocks of ``block_size + 1`` tokens of one long id sequence."""

    def __init__(self, ids: list[int] | torch.Tensor, block_size: int, what: str = "corpus") -> None:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() < block_size + 1:
            raise ValueError(
                f"the {what} has {ids.numel()} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use more text or a smaller block_size"
            )
        self.ids, self.block_size = ids, block_size
        self.n = (ids.numel() - 1) // block_size

    def __len__(self) -> int:
        return self.n

    draws_random_numbers = False  # read by the trainer

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"block index {i} out of range [0, {self.n})")
        s = i * self.block_size
        return self.ids[s : s + self.block_size + 1]


def collate_blocks(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.stack([torch.as_tensor(s) for s in samples])
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def _read_text(path: Any, what: str) -> str:
    if not path:
        raise ValueError(f"data.{what} is not set: the text preset needs --set data.{what}=PATH (UTF-8 text)")
    return read_text(path, what)


class LMTask(TokenizedTask):
    """The Task protocol for causal language modelling (see :mod:`levyattn.training.tasks`)."""

    name = "lm"
    metric = "ppl"
    higher_is_better = False
    dataset_names = DATASETS
    data_keys = DATA_KEYS
    model_types = ("lm",)
    count_keys = ("vocab_size", "block_size")

    def _texts(self) -> tuple[str, str]:
        c = self.data_cfg
        if c["dataset"] == "text":
            return _read_text(c.get("train_file"), "train_file"), _read_text(c.get("eval_file"), "eval_file")
        train, evals = toy_pairs(c.get("toy", {}))
        return "\n".join(t for _, t in train), "\n".join(t for _, t in evals)

    def _load(self) -> None:
        if self._data is not None:
            return
        from levyattn.data.tokenization import train_tokenizer

        c = self.data_cfg
        train_text, eval_text = self._texts()
        lines = [line for line in split_lines(train_text) if line.strip()]
        self.tokenizer = train_tokenizer(lines, c.get("tokenizer", "sentencepiece"),
                                            vocab_size=int(c.get("vocab_size", 1000)))
        block = int(c.get("block_size", 128))

        def encode(text: str) -> list[int]:
            # Lines are sentences/paragraphs: each ends with EOS so the model learns where text ends.
            ids: list[int] = []
            for line in split_lines(text):
                if line.strip():
                    ids.extend(self.tokenizer.encode(line))
                    ids.append(self.tokenizer.eos_id)
            return ids

        train = BlockDataset(encode(train_text), block, "training text")
        evaluation = BlockDataset(encode(eval_text), block, "evaluation text")
        if c.get("limit_train") is not None:
            train = torch.utils.data.Subset(train, range(min(len(train), int(c["limit_train"]))))
        if c.get("limit_eval") is not None:
            evaluation = torch.utils.data.Subset(evaluation, range(min(len(evaluation), int(c["limit_eval"]))))
        self._data = (train, evaluation)

    def datasets(self) -> tuple[Any, Any]:
        self._load()
        return self._data

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_blocks(samples)

    @property
    def model_config(self) -> dict[str, Any]:
        self._load()
        cfg = dict(self._model_cfg)
        cfg.update(vocab_size=self.tokenizer.vocab_size, block_size=int(self.data_cfg.get("block_size", 128)))
        return cfg

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, float]:
        x, y = batch
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return loss, float(y.numel())

    def attention(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[torch.Tensor], None]:
        """Per-layer causal self-attention weights (B, H, L, L) on a batch of blocks, and None:
        blocks have no padding."""
        return list(model(batch[0], output_attentions=True).attentions), None

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        from levyattn.metrics import perplexity

        nll, n = 0.0, 0
        for x, y in loader:
            logits = model(x).logits
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
            n += y.numel()
        if n == 0:
            raise ValueError("the evaluation set is empty")
        return {"loss": nll / n, "ppl": perplexity(nll, n)}


def make_task(preset: dict[str, Any]) -> LMTask:
    return LMTask(preset)


def requirements(preset: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The extras ``preset`` needs: sentencepiece for the SentencePiece tokenizers (the default)."""
    modules = tokenizer_modules(preset["data"].get("tokenizer", "sentencepiece"))
    return {"translate": modules} if modules else {}


# ----------------------------------------------------------------------------- inference


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int = 0,
    use_cache: bool = True,
    stop_at_eos: bool = False,
) -> tuple[list[str], int]:
    """Continue ``prompt`` -> (num_samples detokenised texts, prompt included; new tokens made).

    With ``stop_at_eos`` each sample ends before its first EOS; otherwise it runs for
    ``max_new_tokens`` tokens, across any EOS (which, a special id, decodes to nothing).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens; give some text")
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    prompt_ids = prompt_ids[:, -model.config.block_size :]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         use_cache=use_cache, generator=gen, eos_id=tokenizer.eos_id if stop_at_eos else None)
    texts, n_new = [], 0
    for row in out.tolist():
        new = row[prompt_ids.shape[1] :]
        if stop_at_eos and tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        n_new += len(new)
        texts.append(tokenizer.decode(ids + new))
    return texts, n_new


_LM_SWEEP = {"alphas": [1.2, 1.6, 2.0], "attention": ["fna", "softmax"], "seeds": [0]}
_LM_TRAIN = {"epochs": 10, "batch_size": 32, "eval_batch_size": 64, "lr": 3e-3, "schedule": "cosine",
             "warmup_steps": 20, "weight_decay": 0.01, "grad_clip": 1.0, "device": "cpu"}
_FNA_KERNEL = {"alpha": 1.2, "bandwidth": 1.0, "manifold": "euclidean"}
_LM_SMALL = {"d_model": 64, "num_layers": 2, "num_heads": 4, "dropout": 0.0, **_FNA_KERNEL}
_LM_TEXT = {"d_model": 256, "num_layers": 4, "num_heads": 4, "dropout": 0.1}
_ATTENTIONS = (("fna", "FNA alpha 1.2", _FNA_KERNEL), ("softmax", "softmax", {}))  # (kind, label, kernel settings)

PRESETS: dict[str, dict[str, Any]] = {
    **{
        f"lm-toy-{kind}": {
            "task": "lm", "model_type": "lm",
            "description": f"causal LM on the deterministic toy corpus, {label} (a minute on a CPU)",
            "model": {**_LM_SMALL, "attention": kind},
            "data": {"dataset": "toy", "toy": {}, "vocab_size": 64, "block_size": 64},
            "train": dict(_LM_TRAIN), "sweep": _LM_SWEEP,
        }
        for kind, label, _ in _ATTENTIONS
    },
    **{
        f"lm-text-{kind}": {
            "task": "lm", "model_type": "lm",
            "description": f"causal LM on your text files (--set data.train_file=... data.eval_file=...), {label}",
            "model": {**_LM_TEXT, **kernel, "attention": kind},
            "data": {"dataset": "text", "train_file": None, "eval_file": None, "vocab_size": 4000, "block_size": 256},
            "train": {**_LM_TRAIN, "lr": 6e-4, "device": "auto", "warmup_steps": 200}, "sweep": _LM_SWEEP,
        }
        for kind, label, kernel in _ATTENTIONS
    },
}
