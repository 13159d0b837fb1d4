"""Translation: Multi30K En-De (the paper's setting) and a deterministic toy grammar.

Batches are dicts of tensors::

    src      (B, S) long   source ids, padded with pad_id (no BOS, ends with EOS)
    tgt_in   (B, T) long   BOS + target ids, padded with pad_id
    tgt_out  (B, T) long   target ids + EOS, padded with pad_id (the labels)
    index    (B,)   long   the sentence's position in its split (to find its reference text)

The training loss is the label-smoothed token cross-entropy (the model's
``label_smoothing``; weight = number of target tokens). ``evaluate`` reports ``loss``
(unsmoothed mean token NLL), ``ppl``, and ``bleu`` / ``chrf`` (sacrebleu, 0-100) of
greedy (or ``data.beam_size``) translations, *detokenised* and scored against the raw
reference lines of the evaluation split. The headline metric is ``bleu``. On the toy
grammar ``evaluate`` also reports ``agreement``: the fraction of translations whose
sentence-final predicate adjective carries the reference's gender/number suffix
(``levyattn.data.translation.toy_agreement_accuracy``), the long-range dependency.

Multi30K: one subword tokeniser (sentencepiece by default) is trained on the source and
target sides of the training split together (a joint vocabulary, so ``share_embeddings``
is possible). The toy presets use ``tokenizer="toy"``: the grammar's fixed word vocabulary,
also joint. :meth:`TranslationTask.save_artifacts` writes the tokeniser beside the
checkpoint (the trainer calls it when a run starts), where ``levyattn translate`` finds it.

``data`` settings of a preset:

- ``dataset``: "multi30k" (the standard files ``train``/``val``/``test_2016_flickr``
  ``.en``/``.de``, optionally gzipped, in ``data_dir``; nothing is downloaded) or "toy"
  (``levyattn.data.make_toy_translation``, keyword arguments under ``toy``);
- ``src_lang`` / ``tgt_lang`` ("en" / "de"), ``eval_split`` ("valid" or "test");
- ``tokenizer``: "sentencepiece" (default), "bpe", "word" (case kept: a lower-cased
  vocabulary would score a perfect translation at BLEU 12), "byte", or "toy" (the toy
  grammar's fixed word vocabulary);
- toy data: ``toy`` = {``n_train`` (default 3000), ``n_eval`` (200), ``seed`` (0; the
  evaluation pairs come from ``seed + 1_000_003``, skipping sentences of the training
  set), and ``make_toy_translation``'s grammar settings ``min_pp`` (1), ``max_pp`` (4)
  prepositional phrases between the subject and its predicate adjective, ``p_adj``
  (0.5)}; the toy presets train on the defaults;
- ``vocab_size`` (sentencepiece pieces), ``max_len`` (longest source/target in tokens,
  longer pairs are dropped from training and truncated at evaluation);
- ``limit_train`` / ``limit_eval`` (first N pairs), ``beam_size``, ``length_penalty``,
  ``max_decode_len`` (default: the longest reference + 10 tokens, at most max_len - 1).

The model config in a preset leaves out what the data decides (vocabulary sizes, the
special ids, ``max_len``); the task fills it in.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from levyattn.models.seq2seq import sequence_loss
from levyattn.training.tasks.tokenized import TokenizedTask, tokenizer_modules, toy_pairs

DATASETS = ("multi30k", "toy")
# Every data setting the task reads (the module docstring says what each does).
DATA_KEYS = ("dataset", "data_dir", "src_lang", "tgt_lang", "eval_split", "toy", "tokenizer", "vocab_size", "max_len",
             "limit_train", "limit_eval", "beam_size", "length_penalty", "max_decode_len")


class PairDataset(torch.utils.data.Dataset):
    """Encoded sentence pairs: item i is (src_ids list, tgt_ids list, i)."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]], refs: list[str], sources: list[str]) -> None:
        if not (len(src) == len(tgt) == len(refs) == len(sources)):
            raise ValueError("src, tgt, refs and sources must have the same length")
        self.src, self.tgt, self.refs, self.sources = src, tgt, refs, sources

    def __len__(self) -> int:
        return len(self.src)

    draws_random_numbers = False  # read by the trainer

    def __getitem__(self, i: int) -> tuple[list[int], list[int], int]:
        return self.src[i], self.tgt[i], i


def collate_pairs(samples: list, pad_id: int, bos_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """[(src_ids, tgt_ids, index), ...] -> the batch dict (see the module docstring)."""
    if not samples:
        raise ValueError("collate_pairs got an empty list of samples")
    b = len(samples)
    s = max(len(x[0]) for x in samples) + 1
    t = max(len(x[1]) for x in samples) + 1
    src = torch.full((b, s), pad_id, dtype=torch.long)
    tgt_in = torch.full((b, t), pad_id, dtype=torch.long)
    tgt_out = torch.full((b, t), pad_id, dtype=torch.long)
    for i, (x, y, _) in enumerate(samples):
        src[i, : len(x) + 1] = torch.tensor(list(x) + [eos_id], dtype=torch.long)
        tgt_in[i, : len(y) + 1] = torch.tensor([bos_id] + list(y), dtype=torch.long)
        tgt_out[i, : len(y) + 1] = torch.tensor(list(y) + [eos_id], dtype=torch.long)
    index = torch.tensor([int(x[2]) for x in samples], dtype=torch.long)
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "index": index}


def strip_special(ids: list[int], pad_id: int, bos_id: int, eos_id: int) -> list[int]:
    """Token ids up to the first EOS, without BOS/padding."""
    out = []
    for t in ids:
        if t == eos_id:
            break
        if t not in (pad_id, bos_id):
            out.append(int(t))
    return out


@torch.no_grad()
def translate_ids(
    model: nn.Module,
    src: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    bos_id: int,
    max_len: int,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Translate encoded sentences (lists of ids, without EOS) -> lists of target ids
    (without BOS/EOS/padding), in the same order."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(src), batch_size):
        chunk = src[start : start + batch_size]
        batch = collate_pairs([(x, [], i) for i, x in enumerate(chunk)], pad_id, bos_id, eos_id)["src"].to(device)
        ids = model.generate(batch, max_len, beam_size=beam_size, length_penalty=length_penalty)
        out.extend(strip_special(row, pad_id, bos_id, eos_id) for row in ids.tolist())
    return out


class TranslationTask(TokenizedTask):
    """The Task protocol for translation (see :mod:`levyattn.training.tasks`)."""

    name = "translation"
    metric = "bleu"
    higher_is_better = True
    dataset_names = DATASETS
    data_keys = DATA_KEYS
    model_types = ("seq2seq",)
    count_keys = ("vocab_size", "max_len", "beam_size")

    # -- data -------------------------------------------------------------------------

    def _raw_pairs(self) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
        """(train (src lines, tgt lines), eval (src lines, tgt lines)) as plain text."""
        from levyattn.data.translation import read_multi30k

        c = self.data_cfg
        if self.dataset == "multi30k":
            data_dir = c.get("data_dir")
            if not data_dir:
                raise ValueError(
                    "the multi30k presets need the Multi30K files on disk (train/val/test_2016_flickr .en/.de, "
                    "optionally .gz): pass --set data_dir=PATH; nothing is downloaded"
                )
            split = c.get("eval_split", "valid")
            splits = read_multi30k(data_dir, c.get("src_lang", "en"), c.get("tgt_lang", "de"), splits=("train", split))
            return splits["train"], splits[split]
        train, evals = toy_pairs(c.get("toy", {}))
        return _as_lines(train, "training"), _as_lines(evals, "evaluation")

    def _load(self) -> None:
        if self._data is not None:
            return
        from levyattn.data.tokenization import train_tokenizer

        c = self.data_cfg
        (tr_src, tr_tgt), (ev_src, ev_tgt) = self._raw_pairs()
        if "limit_train" in c and c["limit_train"] is not None:
            tr_src, tr_tgt = tr_src[: c["limit_train"]], tr_tgt[: c["limit_train"]]
        if "limit_eval" in c and c["limit_eval"] is not None:
            ev_src, ev_tgt = ev_src[: c["limit_eval"]], ev_tgt[: c["limit_eval"]]
        if not tr_src or not ev_src:
            raise ValueError(f"the {self.dataset} data has {len(tr_src)} training and {len(ev_src)} evaluation pairs; "
                             "both need at least one")
        if c.get("tokenizer") == "toy":
            from levyattn.data.translation import toy_tokenizer

            self.tokenizer = toy_tokenizer()  # the toy grammar's fixed word vocabulary
        else:
            kind = c.get("tokenizer", "sentencepiece")
            # A word vocabulary keeps case: BLEU compares its decoded output with the cased references.
            self.tokenizer = train_tokenizer(tr_src + tr_tgt, kind, vocab_size=int(c.get("vocab_size", 8000)),
                                             **({"lowercase": False} if kind == "word" else {}))
        max_len = int(c.get("max_len", 128))
        tok = self.tokenizer
        # Room for EOS (source) / BOS or EOS (target) within max_len.
        tr_s = [tok.encode(x) for x in tr_src]
        tr_t = [tok.encode(y) for y in tr_tgt]
        keep = [i for i in range(len(tr_s)) if len(tr_s[i]) < max_len and len(tr_t[i]) < max_len]
        if not keep:
            raise ValueError(f"every training pair is longer than data.max_len={max_len} tokens")
        train = PairDataset([tr_s[i] for i in keep], [tr_t[i] for i in keep],
                            [tr_tgt[i] for i in keep], [tr_src[i] for i in keep])
        ev_s = [tok.encode(x)[: max_len - 1] for x in ev_src]
        ev_t = [tok.encode(y)[: max_len - 1] for y in ev_tgt]
        evaluation = PairDataset(ev_s, ev_t, list(ev_tgt), list(ev_src))
        self._data = (train, evaluation)

    def datasets(self) -> tuple[PairDataset, PairDataset]:
        self._load()
        return self._data

    def collate(self, samples: list) -> dict[str, torch.Tensor]:
        self._load()
        t = self.tokenizer
        return collate_pairs(samples, t.pad_id, t.bos_id, t.eos_id)

    # -- model ------------------------------------------------------------------------

    @property
    def model_config(self) -> dict[str, Any]:
        self._load()
        t = self.tokenizer
        cfg = dict(self._model_cfg)
        cfg.update(src_vocab_size=t.vocab_size, tgt_vocab_size=t.vocab_size, pad_id=t.pad_id, bos_id=t.bos_id,
                   eos_id=t.eos_id, max_len=int(self.data_cfg.get("max_len", 128)))
        return cfg

    # -- loss and metrics -------------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        logits = model(batch["src"], batch["tgt_in"]).logits
        smoothing = getattr(getattr(model, "module", model).config, "label_smoothing", 0.0)
        return sequence_loss(logits, batch["tgt_out"], self.tokenizer.pad_id, smoothing)

    def attention(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-layer encoder self-attention weights (B, H, S, S) on a batch and the valid source
        tokens (B, S) bool (False = padding)."""
        out = model(batch["src"], batch["tgt_in"], output_attentions=True)
        return list(out.encoder_attentions), batch["src"] != self.tokenizer.pad_id

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        from levyattn.metrics import perplexity, translation_scores

        self._load()
        t = self.tokenizer
        c = self.data_cfg
        inner = getattr(model, "module", model)
        evaluation = self._data[1]
        max_len = int(c.get("max_len", 128))
        nll_sum, n_tokens = 0.0, 0
        hyps: dict[int, str] = {}
        longest = max(len(y) for y in evaluation.tgt)
        decode_len = int(c.get("max_decode_len", min(longest + 10, max_len - 1)))
        for batch in loader:
            logits = inner(batch["src"], batch["tgt_in"]).logits
            loss, n = sequence_loss(logits, batch["tgt_out"], t.pad_id, 0.0)
            nll_sum += float(loss) * n
            n_tokens += n
            ids = inner.generate(batch["src"], decode_len, beam_size=int(c.get("beam_size", 1)),
                                 length_penalty=float(c.get("length_penalty", 1.0)))
            for idx, row in zip(batch["index"].tolist(), ids.tolist()):
                hyps[idx] = t.decode(strip_special(row, t.pad_id, t.bos_id, t.eos_id))
        order = sorted(hyps)
        scores = translation_scores([hyps[i] for i in order], [evaluation.refs[i] for i in order],
                                    tokenized=self.dataset == "toy")
        self.last_translations = [hyps[i] for i in order]
        out = {"bleu": scores.bleu, "chrf": scores.chrf, "loss": nll_sum / max(n_tokens, 1),
               "ppl": perplexity(nll_sum, n_tokens) if n_tokens else float("inf")}
        if self.dataset == "toy":
            from levyattn.data.translation import toy_agreement_accuracy

            out["agreement"] = toy_agreement_accuracy(self.last_translations, [evaluation.refs[i] for i in order])
        return out


def _as_lines(pairs: Any, what: str) -> tuple[list[str], list[str]]:
    """Accept (src_lines, tgt_lines) or a sequence of (src, tgt) pairs; return two lists."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, list | tuple) for p in pairs) \
            and (not pairs[0] or isinstance(pairs[0][0], str)):
        src, tgt = list(pairs[0]), list(pairs[1])
    else:
        pairs = list(pairs)
        src = [p[0] for p in pairs]
        tgt = [p[1] for p in pairs]
    if len(src) != len(tgt):
        raise ValueError(f"the {what} data has {len(src)} source and {len(tgt)} target sentences")
    return src, tgt


def make_task(preset: dict[str, Any]) -> TranslationTask:
    return TranslationTask(preset)


def requirements(preset: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The extras ``preset`` needs: sacrebleu for BLEU/chrF, sentencepiece for its tokenizers."""
    return {"translate": ("sacrebleu", *tokenizer_modules(preset["data"].get("tokenizer", "sentencepiece")))}


# ----------------------------------------------------------------------------- presets

# The paper's translation settings (docs/training.md: Multi30K En-De, alpha 1.2, bandwidth 1,
# Euclidean, lr 2.2e-4), on the classic Transformer-base-like Multi30K configuration.
_PAPER_MODEL = {
    "d_model": 512, "num_encoder_layers": 3, "num_decoder_layers": 3, "num_heads": 8, "dim_feedforward": 512,
    "dropout": 0.1, "label_smoothing": 0.1, "alpha": 1.2, "bandwidth": 1.0, "manifold": "euclidean",
    "share_embeddings": True, "tie_output": True,
}
_PAPER_TRAIN = {"epochs": 20, "batch_size": 128, "eval_batch_size": 128, "lr": 2.2e-4, "schedule": "cosine",
                "warmup_steps": 500, "weight_decay": 0.0, "betas": [0.9, 0.98], "grad_clip": 1.0}
_MULTI30K = {"dataset": "multi30k", "data_dir": None, "src_lang": "en", "tgt_lang": "de", "eval_split": "valid",
             "vocab_size": 8000, "max_len": 128, "beam_size": 1}
_SWEEP = {"alphas": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0], "attention": ["fna", "softmax"], "seeds": [0, 1, 2]}


def _attn(kind: str) -> dict[str, str]:
    return {"encoder_attention": kind, "decoder_attention": kind, "cross_attention": kind}


_SMALL_MODEL = {
    "d_model": 64, "num_encoder_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "dim_feedforward": 128,
    "dropout": 0.0, "label_smoothing": 0.0, "alpha": 1.2, "bandwidth": 1.0, "manifold": "euclidean",
    "share_embeddings": True, "tie_output": True,
}
_SMALL_TRAIN = {"epochs": 12, "batch_size": 32, "eval_batch_size": 64, "lr": 3e-3, "schedule": "cosine",
                "warmup_steps": 50, "weight_decay": 0.0, "betas": [0.9, 0.98], "grad_clip": 1.0, "device": "cpu"}
_ATTENTIONS = (("fna", "FNA alpha 1.2"), ("softmax", "softmax"))  # (kind, as a description names it)
_TOY = {"dataset": "toy", "toy": {"n_train": 3000, "n_eval": 200, "seed": 0}, "tokenizer": "toy", "max_len": 64,
        "beam_size": 1}

PRESETS: dict[str, dict[str, Any]] = {
    "multi30k-fna": {
        "task": "translation", "model_type": "seq2seq",
        "description": "Multi30K En-De, encoder-decoder with FNA everywhere (alpha 1.2, eps 1, Euclidean, lr 2.2e-4)",
        "model": {**_PAPER_MODEL, **_attn("fna")}, "data": dict(_MULTI30K), "train": dict(_PAPER_TRAIN),
        "sweep": _SWEEP,
    },
    "multi30k-softmax": {
        "task": "translation", "model_type": "seq2seq",
        "description": "Multi30K En-De, the same encoder-decoder with softmax attention (the baseline)",
        "model": {**_PAPER_MODEL, **_attn("softmax")}, "data": dict(_MULTI30K), "train": dict(_PAPER_TRAIN),
        "sweep": _SWEEP,
    },
    **{
        f"multi30k-{kind}-small": {
            "task": "translation", "model_type": "seq2seq",
            "description": f"Multi30K En-De on a CPU: 2+2 layers, d_model 64, {label}, 10k pairs",
            "model": {**_SMALL_MODEL, **_attn(kind)},
            "data": {**_MULTI30K, "vocab_size": 2000, "max_len": 64, "limit_train": 10000, "limit_eval": 200},
            "train": {**_SMALL_TRAIN, "epochs": 5, "lr": 1e-3},
            "sweep": _SWEEP,
        }
        for kind, label in _ATTENTIONS
    },
    **{
        f"toy-translation-{kind}": {
            "task": "translation", "model_type": "seq2seq",
            "description": f"deterministic toy grammar with long-range agreement, {label} (minutes on a CPU)",
            "model": {**_SMALL_MODEL, **_attn(kind)}, "data": copy.deepcopy(_TOY), "train": dict(_SMALL_TRAIN),
            "sweep": _SWEEP,
        }
        for kind, label in _ATTENTIONS
    },
}


# ----------------------------------------------------------------------------- inference


def translate_sentences(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_len: int | None = None,
    batch_size: int = 32,
) -> list[str]:
    """Translate plain sentences -> detokenised translations (same order).

    Sources longer than the model's ``max_len`` are truncated; ``max_len`` of the output
    defaults to 2 x the source length + 10 tokens, at most the model's ``max_len`` - 1.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, got one str")
    c = model.config
    enc = [tokenizer.encode(s)[: c.max_len - 1] for s in sentences]
    if not enc:
        return []
    if max_len is None:
        max_len = min(2 * max(len(x) for x in enc) + 10, c.max_len - 1)
    # Sort by length so that batches hold similar lengths (less padding), then restore the order.
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    ids = translate_ids(model, [enc[i] for i in order], pad_id=c.pad_id, bos_id=c.bos_id, eos_id=c.eos_id,
                        max_len=max_len, beam_size=beam_size, length_penalty=length_penalty, batch_size=batch_size)
    out = [""] * len(enc)
    for pos, i in enumerate(order):
        out[i] = tokenizer.decode(ids[pos])
    return out
