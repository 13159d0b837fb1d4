"""Encoder-decoder Transformer for translation with FNA or softmax attention.

    src_ids (B, S) --embed * sqrt(E) + sin/cos--> [encoder layer] x Le --> memory (B, S, E)
    tgt_in_ids (B, T) --embed * sqrt(E) + sin/cos--> [decoder layer: causal self, cross, FFN] x Ld
        --> generator (linear) --> logits (B, T, V_tgt)

- Encoder self-attention, causal decoder self-attention and cross-attention are each
  "fna" or "softmax" (``encoder_attention``, ``decoder_attention``, ``cross_attention``);
  the FNA options are shared by all FNA sites.
- Post-LN as the reference (``norm_first=False``) or pre-LN (then final LayerNorms).
- Tied embeddings: ``tie_output`` shares the target embedding with the generator,
  ``share_embeddings`` the source and target embeddings (one joint vocabulary).
- :func:`sequence_loss`: token cross-entropy with label smoothing, padding ignored.
- :meth:`Seq2SeqTransformer.generate`: greedy (``beam_size=1``) or beam search with a length
  penalty, both incremental with a key/value cache per decoder layer (the cache changes
  the cost, not the result: each new token costs O(context) instead of O(context^2)).

Conventions: padding masks (``src_key_padding_mask``, ``tgt_key_padding_mask``,
``memory_key_padding_mask``, as ``nn.Transformer`` names them) are (B, L) bool, True = padding
(derived from ``pad_id`` when not given). Decoder inputs start with ``bos_id``; targets are the inputs shifted left,
ending with ``eos_id``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from levyattn.config import check_bool, check_float, check_int
from levyattn.models import common
from levyattn.models.common import Seq2SeqOutput, TransformerOptions
from levyattn.nn import FractionalTransformerDecoderLayer, FractionalTransformerEncoderLayer, KVCache


@dataclass(kw_only=True)
class Seq2SeqConfig(TransformerOptions):
    """Hyperparameters of :class:`Seq2SeqTransformer` (the FNA options and block sizes are
    inherited; d_model must be even, for the sinusoidal positions).

    src_vocab_size, tgt_vocab_size; pad_id, bos_id, eos_id (target vocabulary; pad_id also
    marks source padding); max_len: the longest source or target sequence.
    num_encoder_layers, num_decoder_layers; norm_first: post-LN (the default) or pre-LN.
    encoder_attention, decoder_attention, cross_attention: "fna" or "softmax" each.
    tie_output, share_embeddings: weight tying (see the module docstring).
    label_smoothing: used by :meth:`Seq2SeqTransformer.loss`.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    max_len: int = 256
    d_model: int = 256
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_heads: int = 8
    norm_first: bool = False
    encoder_attention: str = "fna"
    decoder_attention: str = "fna"
    cross_attention: str = "fna"
    tie_output: bool = True
    share_embeddings: bool = False
    label_smoothing: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_int("src_vocab_size", self.src_vocab_size, 1)
        check_int("tgt_vocab_size", self.tgt_vocab_size, 3)
        for name in ("pad_id", "bos_id", "eos_id"):
            check_int(name, getattr(self, name), 0, self.tgt_vocab_size - 1)
        if len({self.pad_id, self.bos_id, self.eos_id}) != 3:
            raise ValueError(f"pad_id, bos_id, eos_id must differ, got {self.pad_id}, {self.bos_id}, {self.eos_id}")
        check_int("max_len", self.max_len, 1)
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal positions), got {self.d_model}")
        check_int("num_encoder_layers", self.num_encoder_layers, 1)
        check_int("num_decoder_layers", self.num_decoder_layers, 1)
        check_bool("norm_first", self.norm_first)
        for name in ("encoder_attention", "decoder_attention", "cross_attention"):
            common.check_attention_kind(name, getattr(self, name))
        check_bool("tie_output", self.tie_output)
        check_bool("share_embeddings", self.share_embeddings)
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs src_vocab_size == tgt_vocab_size, got {self.src_vocab_size} "
                f"and {self.tgt_vocab_size}"
            )
        self.label_smoothing = check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)


def sequence_loss(
    logits: torch.Tensor, targets: torch.Tensor, pad_id: int, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Label-smoothed token cross-entropy: logits (B, T, V), targets (B, T) long.

    Returns (mean loss over non-padding target tokens, their number). With smoothing
    eps the target distribution is (1 - eps) on the label plus eps / V on every token.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and targets (B, T), got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    label_smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
    n_tokens = int((targets != pad_id).sum())
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id,
        label_smoothing=label_smoothing, reduction="sum",
    )  # fmt: skip
    return loss / max(n_tokens, 1), n_tokens


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer (see the module docstring)."""

    model_type = "seq2seq"

    def __init__(self, config: Seq2SeqConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = c = Seq2SeqConfig.coerce(config)
        self.src_embedding = nn.Embedding(c.src_vocab_size, c.d_model)
        self.tgt_embedding = self.src_embedding if c.share_embeddings else nn.Embedding(c.tgt_vocab_size, c.d_model)
        for emb in {id(e): e for e in (self.src_embedding, self.tgt_embedding)}.values():
            # Embeddings are multiplied by sqrt(E) on input: unit scale there, 1/sqrt(E) scale
            # as (tied) output weights.
            nn.init.normal_(emb.weight, std=c.d_model**-0.5)
        self.register_buffer("positions", common.sinusoidal_positions(c.max_len, c.d_model), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder_layers = nn.ModuleList(
            FractionalTransformerEncoderLayer(**c.layer_kwargs(), attention=c.encoder_attention)
            for _ in range(c.num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            FractionalTransformerDecoderLayer(
                **c.layer_kwargs(), self_attention=c.decoder_attention, cross_attention=c.cross_attention
            )
            for _ in range(c.num_decoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.generator = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
        if c.tie_output:
            self.generator.weight = self.tgt_embedding.weight

    # --- the pieces ----------------------------------------------------------------------

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = emb(ids) * math.sqrt(self.config.d_model)
        return self.dropout(x + self.positions[start : start + ids.shape[1]])

    def _encode(
        self, src_ids: torch.Tensor, src_key_padding_mask: torch.Tensor | None, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """:meth:`encode`, and with ``output_attentions`` the encoder's per-layer weights."""
        c = self.config
        common.check_ids("src_ids", src_ids, c.src_vocab_size, c.max_len)
        if src_key_padding_mask is None:
            src_key_padding_mask = src_ids == c.pad_id
        common.check_padding_mask("src_key_padding_mask", src_key_padding_mask, tuple(src_ids.shape))
        x = self._embed(self.src_embedding, src_ids)
        x, weights = common.run_encoder_layers(self.encoder_layers, x, src_key_padding_mask, output_attentions)
        return self.encoder_norm(x), src_key_padding_mask, weights

    def encode(
        self, src_ids: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """src_ids (B, S) -> (memory (B, S, E), src_key_padding_mask (B, S) bool True = padding,
        by default ``src_ids == pad_id``)."""
        memory, mask, _ = self._encode(src_ids, src_key_padding_mask, False)
        return memory, mask

    def _decode(
        self,
        tgt_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None,
        tgt_key_padding_mask: torch.Tensor | None,
        cache: list[KVCache] | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """:meth:`decode`, and with ``output_attentions`` the decoder's per-layer self- and
        cross-attention weights."""
        c = self.config
        past = 0 if cache is None else len(cache[0])
        common.check_ids("tgt_ids", tgt_ids, c.tgt_vocab_size, c.max_len - past)
        x = self._embed(self.tgt_embedding, tgt_ids, start=past)
        self_weights, cross_weights = [], []
        for i, layer in enumerate(self.decoder_layers):
            x = layer(
                x, memory, tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=True, cache=None if cache is None else cache[i], need_weights=output_attentions,
            )  # fmt: skip
            if output_attentions:
                x, w_self, w_cross = x
                self_weights.append(w_self)
                cross_weights.append(w_cross)
        logits = self.generator(self.decoder_norm(x))
        if not output_attentions:
            return logits, None, None
        return logits, tuple(self_weights), tuple(cross_weights)

    def decode(
        self,
        tgt_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """tgt_ids (B, T) -> logits (B, T, V_tgt), attending causally to themselves (and to
        the positions in ``cache``, which they then extend) and to ``memory`` (B, S, E).

        tgt_key_padding_mask: (B, T) bool True = padding, or None (no padding); with a cache
        it covers cached + new positions.
        """
        return self._decode(tgt_ids, memory, memory_key_padding_mask, tgt_key_padding_mask, cache, False)[0]

    def new_cache(self) -> list[KVCache]:
        """One empty :class:`KVCache` per decoder layer."""
        return [KVCache() for _ in self.decoder_layers]

    # --- training ------------------------------------------------------------------------

    def forward(
        self,
        src_ids: torch.Tensor,
        tgt_in_ids: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> Seq2SeqOutput:
        """src_ids (B, S), tgt_in_ids (B, T) (starting with bos_id) -> :class:`Seq2SeqOutput`
        with logits (B, T, V_tgt).

        Padding masks: (B, S) / (B, T) bool True = padding; default ``ids == pad_id``.
        output_attentions: also the per-layer weights: ``encoder_attentions`` (B, H, S, S),
        ``attentions`` (the decoder's self-attention, (B, H, T, T)) and ``cross_attentions``
        (B, H, T, S).
        """
        c = self.config
        common.check_ids("tgt_in_ids", tgt_in_ids, c.tgt_vocab_size, c.max_len)
        if tgt_key_padding_mask is None:
            tgt_key_padding_mask = tgt_in_ids == c.pad_id
        common.check_padding_mask("tgt_key_padding_mask", tgt_key_padding_mask, tuple(tgt_in_ids.shape))
        memory, mask, encoder_weights = self._encode(src_ids, src_key_padding_mask, output_attentions)
        logits, self_weights, cross_weights = self._decode(
            tgt_in_ids, memory, mask, tgt_key_padding_mask, None, output_attentions
        )
        return Seq2SeqOutput(
            logits=logits, attentions=self_weights, encoder_attentions=encoder_weights, cross_attentions=cross_weights
        )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """:func:`sequence_loss` with this model's ``pad_id`` and ``label_smoothing``."""
        return sequence_loss(logits, targets, self.config.pad_id, self.config.label_smoothing)

    # --- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        src_ids: torch.Tensor,
        max_len: int,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        src_key_padding_mask: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Translate src_ids (B, S) -> token ids (B, T), T <= max_len, without the leading BOS.

        Each row ends with ``eos_id`` (unless it hit ``max_len``) and is padded with
        ``pad_id`` after it. ``beam_size=1`` is greedy decoding; larger beams rank finished
        hypotheses by sum(log p) / length ** length_penalty (length counts the EOS).
        ``use_cache`` changes the cost only.
        """
        c = self.config
        check_int("max_len", max_len, 1, c.max_len - 1)
        check_int("beam_size", beam_size, 1)
        length_penalty = check_float("length_penalty", length_penalty, -10.0, 10.0)
        was_training = self.training
        self.eval()
        try:
            memory, mask = self.encode(src_ids, src_key_padding_mask)
            if beam_size == 1:
                return self._greedy(memory, mask, max_len, use_cache)
            return self._beam(memory, mask, max_len, beam_size, length_penalty, use_cache)
        finally:
            self.train(was_training)

    def _step(
        self, ids: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, cache: list[KVCache] | None
    ) -> torch.Tensor:
        """Log-probabilities (B, V) of the next token after ids (B, t) (with BOS)."""
        if cache is None:
            logits = self.decode(ids, memory, mask)
        else:
            logits = self.decode(ids[:, len(cache[0]) :], memory, mask, cache=cache)
        return logits[:, -1].float().log_softmax(dim=-1)

    def _greedy(self, memory: torch.Tensor, mask: torch.Tensor, max_len: int, use_cache: bool) -> torch.Tensor:
        c = self.config
        b = memory.shape[0]
        ids = torch.full((b, 1), c.bos_id, dtype=torch.long, device=memory.device)
        cache = self.new_cache() if use_cache else None
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for _ in range(max_len):
            next_id = self._step(ids, memory, mask, cache).argmax(dim=-1)
            next_id = next_id.masked_fill(done, c.pad_id)
            ids = torch.cat([ids, next_id.unsqueeze(1)], dim=1)
            done |= next_id == c.eos_id
            if bool(done.all()):
                break
        return ids[:, 1:]

    def _beam(
        self, memory: torch.Tensor, mask: torch.Tensor, max_len: int, k: int, length_penalty: float, use_cache: bool
    ) -> torch.Tensor:
        c = self.config
        b, device = memory.shape[0], memory.device
        # Beams are laid out batch-major: row r = batch r // k, beam r % k.
        memory = memory.repeat_interleave(k, dim=0)
        mask = mask.repeat_interleave(k, dim=0)
        ids = torch.full((b * k, 1), c.bos_id, dtype=torch.long, device=device)
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start equal: keep one so the first step has no duplicates
        cache = self.new_cache() if use_cache else None
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = [False] * b
        offsets = (torch.arange(b, device=device) * k).unsqueeze(1)

        def normalised(score: float, length: int) -> float:
            return score / (length**length_penalty)

        for step in range(1, max_len + 1):
            logp = self._step(ids, memory, mask, cache)  # (B * k, V)
            vocab = logp.shape[-1]
            cand = (scores.unsqueeze(-1) + logp.view(b, k, vocab)).view(b, k * vocab)
            top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=-1)  # (B, 2k): room for k non-EOS
            beam_src, tokens = top_idx // vocab, top_idx % vocab
            new_scores = torch.full((b, k), float("-inf"), device=device)
            new_src = torch.zeros((b, k), dtype=torch.long, device=device)
            new_tok = torch.full((b, k), c.pad_id, dtype=torch.long, device=device)
            ts, bs, tk = top_scores.tolist(), beam_src.tolist(), tokens.tolist()
            for i in range(b):
                if done[i]:
                    continue
                n_alive = 0
                for rank in range(len(tk[i])):
                    if ts[i][rank] == float("-inf"):
                        break
                    if tk[i][rank] == c.eos_id:
                        # An EOS among the top k candidates finishes a hypothesis.
                        if rank < k:
                            seq = ids[i * k + bs[i][rank], 1:].tolist() + [c.eos_id]
                            finished[i].append((normalised(ts[i][rank], step), seq))
                    elif n_alive < k:
                        new_scores[i, n_alive] = ts[i][rank]
                        new_src[i, n_alive] = bs[i][rank]
                        new_tok[i, n_alive] = tk[i][rank]
                        n_alive += 1
                    if n_alive == k and rank >= k - 1:
                        break
                # Done when k hypotheses are finished and no live beam (scored at its current
                # length) beats the worst of the best k.
                if len(finished[i]) >= k:
                    best = sorted((s for s, _ in finished[i]), reverse=True)[:k]
                    if n_alive == 0 or normalised(float(new_scores[i, 0]), step) <= best[-1]:
                        done[i] = True
            if all(done):
                break
            rows = (new_src + offsets).view(-1)
            ids = torch.cat([ids.index_select(0, rows), new_tok.view(-1, 1)], dim=1)
            scores = new_scores
            if cache is not None:
                for layer_cache in cache:
                    layer_cache.reorder(rows)
        for i in range(b):
            if not done[i]:  # ran out of length: the live beams compete as they are
                for j in range(k):
                    if scores[i, j] > float("-inf"):
                        finished[i].append((normalised(float(scores[i, j]), max_len), ids[i * k + j, 1:].tolist()))
        best_seqs = [max(f, key=lambda t: t[0])[1] for f in finished]
        out = torch.full((b, max(len(s) for s in best_seqs)), c.pad_id, dtype=torch.long, device=device)
        for i, seq in enumerate(best_seqs):
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
        return out
