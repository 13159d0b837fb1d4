"""A causal language model with FNA or softmax attention, in the style of nanoGPT's model.py.

    input_ids (B, L) --token + learned position embeddings--> [Block] x L --> LayerNorm --> lm_head --> (B, L, V)
    Block: x = x + attn(ln_1(x)) (causal) ; x = x + mlp(ln_2(x))          (pre-LN, GPT-2)

Generation (:meth:`CausalLM.generate`) samples with temperature, top-k and top-p, with a
key/value cache (:class:`levyattn.nn.KVCache`, one per layer) so each new token costs
O(context) instead of re-running the whole prefix. The cache changes nothing but the
cost: cached and uncached decoding compute the same logits and so the same tokens.
When the context outgrows ``block_size`` both crop it to the last ``block_size`` tokens
(the cache is then rebuilt, since learned positions shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from levyattn.config import check_bool, check_float, check_int
from levyattn.models import common
from levyattn.models.common import ModelOutput, TransformerOptions
from levyattn.nn import FeedForward, KVCache, make_attention


@dataclass(kw_only=True)
class CausalLMConfig(TransformerOptions):
    """Hyperparameters of :class:`CausalLM` (the FNA options and block sizes are inherited).

    vocab_size; block_size: the longest context; num_layers;
    tie_embeddings: the output projection shares the token embedding's weight.
    """

    vocab_size: int
    block_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    dropout: float = 0.0
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention: str = "fna"

    def validate(self) -> None:
        super().validate()
        check_int("vocab_size", self.vocab_size, 1)
        check_int("block_size", self.block_size, 1)
        check_int("num_layers", self.num_layers, 1)
        check_bool("tie_embeddings", self.tie_embeddings)
        common.check_attention_kind("attention", self.attention)


class Block(nn.Module):
    """Pre-LN Transformer block with causal self-attention and an optional KV cache."""

    def __init__(self, c: CausalLMConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.attn = make_attention(c.attention, c.d_model, c.num_heads, batch_first=True, **c.attention_kwargs())
        self.ln_2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.mlp = FeedForward(c.d_model, c.ffn_dim, c.dropout, c.activation)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, E) -> ((B, T, E), weights (B, H, T, S) or None); S = cached + T keys."""
        h = self.ln_1(x)
        attn, weights = self.attn(
            h, h, h, key_padding_mask=key_padding_mask, need_weights=need_weights,
            average_attn_weights=False, is_causal=True, kv_cache=cache,
        )  # fmt: skip
        x = x + self.dropout(attn)
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class CausalLM(nn.Module):
    """GPT-style decoder-only language model (see the module docstring)."""

    model_type = "lm"

    def __init__(self, config: CausalLMConfig | dict[str, Any]) -> None:
        super().__init__()
        self.config = c = CausalLMConfig.coerce(config)
        self.token_embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.position_embedding = nn.Embedding(c.block_size, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: residual output projections scaled down by sqrt(2 * layers).
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp.linear2):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * c.num_layers))
        if c.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Orthogonal (parametrised) projections keep their own initialisation.
        if nn.utils.parametrize.is_parametrized(module):
            return
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self) -> list[KVCache]:
        """One empty :class:`KVCache` per layer."""
        return [KVCache() for _ in self.blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        *,
        cache: list[KVCache] | None = None,
    ) -> ModelOutput:
        """input_ids (B, L) long -> :class:`ModelOutput` with logits (B, L, V).

        key_padding_mask: (B, S) bool, True = padding, over cached + new positions.
        output_attentions: also the per-layer (B, H, L, S) weights.
        cache: from :meth:`new_cache`; ``input_ids`` are then the new positions only, placed
            after the cached ones (which they attend to), and the cache is extended in place.
        """
        c = self.config
        common.check_ids("input_ids", input_ids, c.vocab_size)
        past = 0 if cache is None else len(cache[0])
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache must hold one KVCache per layer ({len(self.blocks)}), got {len(cache)}")
        b, t = input_ids.shape
        if past + t > c.block_size:
            raise ValueError(f"context length must be <= block_size={c.block_size}, got {past + t}")
        common.check_padding_mask("key_padding_mask", key_padding_mask, (b, past + t))

        positions = torch.arange(past, past + t, device=input_ids.device)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        weights = []
        for i, block in enumerate(self.blocks):
            x, w = block(x, key_padding_mask, None if cache is None else cache[i], output_attentions)
            weights.append(w)
        return ModelOutput(logits=self.lm_head(self.ln_f(x)), attentions=tuple(weights) if output_attentions else None)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Continue prompt_ids (B, P) by max_new_tokens -> (B, P + max_new_tokens) long.

        temperature 0 is greedy (argmax); otherwise logits / temperature are sampled after
        keeping the top_k most likely tokens and/or the smallest set whose probability
        reaches top_p. ``generator`` makes sampling reproducible. ``use_cache`` changes the
        cost only. With ``eos_id``, rows that produced it are padded with ``eos_id`` and
        generation stops early once every row has.
        """
        c = self.config
        common.check_ids("prompt_ids", prompt_ids, c.vocab_size)
        if prompt_ids.shape[1] < 1:
            raise ValueError("prompt_ids must hold at least one token per row")
        check_int("max_new_tokens", max_new_tokens, 0)
        temperature = check_float("temperature", temperature, 0.0, math.inf, hi_open=True)
        if top_k is not None:
            check_int("top_k", top_k, 1)
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        if eos_id is not None:
            check_int("eos_id", eos_id, 0, c.vocab_size - 1)

        was_training = self.training
        self.eval()
        ids = prompt_ids
        cache = self.new_cache() if use_cache else None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        try:
            for _ in range(max_new_tokens):
                if cache is None:
                    logits = self(ids[:, -c.block_size :]).logits
                elif len(cache[0]) == 0 or len(cache[0]) + 1 > c.block_size:
                    # First step, or the window slid: (re)build the cache from the cropped context.
                    cache = self.new_cache()
                    logits = self(ids[:, -c.block_size :], cache=cache).logits
                else:
                    logits = self(ids[:, -1:], cache=cache).logits
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
                    done |= next_id == eos_id
                ids = torch.cat([ids, next_id.unsqueeze(1)], dim=1)
                if eos_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return ids


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): argmax when temperature is 0, else a sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the top one always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
