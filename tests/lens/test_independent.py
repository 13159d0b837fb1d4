"""measure_decay against an independent numpy computation on hand-built attention matrices.

Every layer and head has its own power law ``c |i - j|^-gamma`` times a factor of the key's
token (so prompts differ), key 0 taking the rest of each row; the reference reads the same
weights with explicit loops over queries, heads and layers, in the protocol's order of means.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from levyattn.lens import DenseOptions, measure_decay
from levyattn.lens.prompts import Prompts

GAMMAS = np.array([[0.6, 1.4], [0.9, 1.1]])  # (layers, heads)
DIST = [10, 30, 60, 120]
SEEDS = (1, 2)
N_PROMPTS = 3


def _weights(ids: np.ndarray, causal: bool) -> np.ndarray:
    """(B, Ly, H, L, L) float64 row-stochastic weights for token ids (B, L)."""
    n = ids.shape[1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    dist = np.abs(i - j).astype(np.float64)
    allowed = ((j <= i) if causal else np.ones((n, n), bool)) & (j > 0)
    key_factor = 1.0 + 0.3 * np.sin(ids.astype(np.float64))  # (B, L)
    out = np.zeros((ids.shape[0], *GAMMAS.shape, n, n))
    for layer, head in np.ndindex(GAMMAS.shape):
        w = 0.002 * np.where(dist > 0, np.maximum(dist, 1.0) ** -GAMMAS[layer, head], 1.0) * allowed
        w = w[None] * key_factor[:, None, :]
        w[..., 0] = 1.0 - w.sum(-1)
        out[:, layer, head] = w
    return out


def _attentions_fn(causal: bool):
    def attentions_fn(input_ids: torch.Tensor) -> list[torch.Tensor]:
        weights = _weights(input_ids.numpy(), causal)
        return [torch.as_tensor(weights[:, layer]) for layer in range(weights.shape[1])]

    return attentions_fn


def _reference(protocol: str, causal: bool, normalize: str) -> np.ndarray:
    """(D,) A(d): per pair, mean over pairs per head, then heads, layers, prompts, seeds."""
    prompts = Prompts(0, 999, None, "random")
    length = max(DIST) + 50
    per_seed = []
    for seed in SEEDS:
        per_prompt = []
        for ids in prompts.draw(seed, N_PROMPTS, length):
            curve = []
            for d in DIST:
                if protocol == "published":  # a prompt of d + 50 tokens, last query, key d before it
                    n = d + 50
                    a = _weights(ids[None, :n], causal)[0]
                    curve.append(a[:, :, n - 1, n - 1 - d].mean(axis=1).mean(axis=0))
                    continue
                a = _weights(ids[None], causal)[0]
                layer_means = []
                for layer in range(GAMMAS.shape[0]):
                    head_means = []
                    for head in range(GAMMAS.shape[1]):
                        pairs = []
                        for q in range(length):
                            for k in (q - d,) if causal else (q - d, q + d):
                                if not 1 <= k < length:  # key 0, the sink, is left out
                                    continue
                                w = a[layer, head, q, k]
                                if normalize == "relative":  # times the keys q may attend to, the sink left out
                                    w *= q if causal else length - 1
                                elif normalize == "renorm":
                                    w /= a[layer, head, q, 1:].sum()
                                pairs.append(w)
                        head_means.append(np.mean(pairs))
                    layer_means.append(np.mean(head_means))
                curve.append(np.mean(layer_means))
            per_prompt.append(curve)
        per_seed.append(np.mean(per_prompt, axis=0))
    return np.mean(per_seed, axis=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("protocol, normalize", [("published", "none"), ("dense", "none"), ("dense", "relative"),
                                                 ("dense", "renorm")])  # fmt: skip
def test_measure_decay_equals_an_independent_computation(protocol, normalize, causal):
    m = measure_decay(None, attentions_fn=_attentions_fn(causal), protocol=protocol, distances=DIST,
                      n_prompts=N_PROMPTS, seeds=SEEDS, token_range=(0, 999), dense=DenseOptions(normalize=normalize),
                      batch_size=2)  # fmt: skip
    assert m.causal is causal and m.passes == ("dense" if protocol == "dense" else "one" if causal else "per_distance")
    np.testing.assert_allclose(m.aggregate, _reference(protocol, causal, normalize), rtol=1e-12)
