"""Stand-in models whose attention is an exact power law of known gamma (for tests and checks).

:class:`PowerLawAttentionModel` follows the Hugging Face calling convention the lens uses:
``model(input_ids=ids, output_attentions=True)`` returns an object whose ``.attentions`` is a
tuple (one per layer) of (B, H, L, L) row-stochastic weights. For a key ``j >= 1``:

    A(i, j) = c_h * |i - j| ** -gamma_h          (j != i; causal: only j < i)
    A(i, i) = c_h

and key 0 (an "attention sink") takes the rest of the row's mass, so every row sums to 1 while
the weight at distance ``d`` does not depend on the sequence length. The published protocol
(key at position 49) and the dense protocol with the sink excluded therefore read exactly
``c_h d^-gamma_h``. ``noise`` multiplies each weight by ``1 + noise * u(token_j)`` with ``u`` a
fixed pseudo-random value in [-1, 1] of the key's token id, so prompts differ while the mean
over uniform random tokens stays close to the power law.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

__all__ = ["PowerLawAttentionModel"]


class PowerLawAttentionModel(nn.Module):
    """Exact power-law attention. ``gamma``: a number or an (n_layers, n_heads) array."""

    def __init__(
        self,
        gamma: float | np.ndarray = 0.8,
        n_layers: int = 2,
        n_heads: int = 2,
        max_positions: int = 2100,
        causal: bool = True,
        noise: float = 0.0,
        vocab_size: int = 50_000,
    ) -> None:
        super().__init__()
        g = np.broadcast_to(np.asarray(gamma, dtype=np.float64), (n_layers, n_heads)).copy()
        if not np.all(np.isfinite(g)) or np.any(g <= 0):
            raise ValueError(f"gamma must be positive and finite, got {g.tolist()}")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}")
        if max_positions < 2:
            raise ValueError(f"max_positions must be >= 2, got {max_positions}")
        self.gammas = g
        self.n_layers, self.n_heads = n_layers, n_heads
        self.max_positions, self.causal, self.noise = max_positions, causal, noise
        self.vocab_size = vocab_size
        k = np.arange(1, max_positions + 1, dtype=np.float64)
        sides = 1.0 if causal else 2.0
        # c small enough that the non-sink weights of the longest row sum to at most 1/2.
        total = 1.0 + sides * (k[None, None, :] ** -g[..., None]).sum(-1)
        self.c = 0.5 / ((1.0 + noise) * total)  # (n_layers, n_heads)
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)

    def _base(self, n: int) -> list[torch.Tensor]:
        """Per layer, the (H, L, L) non-sink weights ``c |i - j|^-gamma``; cached per length."""
        if getattr(self, "_cache_n", None) != n:
            pos = torch.arange(n, dtype=torch.float64)
            dist = (pos[:, None] - pos[None, :]).abs()  # (L, L)
            allowed = torch.ones(n, n, dtype=torch.bool)
            if self.causal:
                allowed = torch.tril(allowed)
            allowed[:, 0] = False  # key 0 is the sink, filled in forward
            base = []
            for layer in range(self.n_layers):
                g = torch.as_tensor(self.gammas[layer], dtype=torch.float64)[:, None, None]  # (H, 1, 1)
                c = torch.as_tensor(self.c[layer], dtype=torch.float64)[:, None, None]
                w = c * torch.where(dist > 0, dist.clamp(min=1.0) ** -g, torch.ones(()))
                base.append(torch.where(allowed, w, torch.zeros(())))
            self._cache_n, self._cache = n, base
        return self._cache

    def _token_factor(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = (input_ids.to(torch.int64) * 2654435761) % 65536
        return 1.0 + self.noise * (h.to(torch.float64) / 32768.0 - 1.0)  # (B, L)

    def forward(self, input_ids: torch.Tensor, output_attentions: bool = False, **kwargs: object) -> SimpleNamespace:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        b, n = input_ids.shape
        if n > self.max_positions:
            raise ValueError(f"sequence length {n} exceeds max_positions {self.max_positions}")
        factor = self._token_factor(input_ids)[:, None, None, :]  # (B, 1, 1, L) by key
        layers = []
        for base in self._base(n):
            w = base.unsqueeze(0) * factor  # (B, H, L, L)
            w[..., 0] = 1.0 - w.sum(-1)
            layers.append(w.to(torch.float32))
        return SimpleNamespace(attentions=tuple(layers) if output_attentions else None, last_hidden_state=None)
