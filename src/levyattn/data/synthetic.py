"""Synthetic multiscale sequence classification, generated on the fly (no files).

Each sequence of ``seq_len`` tokens holds exactly two *tagged* tokens a controlled
distance ``d`` apart, ``d`` uniform in ``[d_min, d_max]``; the label is a function of the
two tagged tokens, so a model must relate positions ``d`` apart. Everything else is
filler: random noise tokens and, with probability ``distractor_rate`` per position,
*untagged* copies of the value tokens (distractors that look like the tagged ones but
do not count).

Vocabulary (``K = n_values``)::

    0                  <pad>
    1 .. K             T_0 .. T_{K-1}   tagged values (a tag and a value in one token)
    K+1 .. 2K          V_0 .. V_{K-1}   untagged values (distractors)
    2K+1 .. 2K+n_noise N_0 ..           noise

Construction of one item (label drawn first, uniform over {0, 1}):

- ``kind="match"`` (default): label 1 iff the two tagged values are equal (with
  ``n_values=2`` this is XOR of two bits, negated). Each tagged token alone, its value
  and its position, is independent of the label; only the pair decides. Attention can
  solve it in one layer: a tagged token finds its partner by similarity ``d`` tokens
  away and compares values. A model that mixes tokens only within windows narrower than
  ``d_min``, pools them and reads the pool out linearly cannot solve it (equality is not
  linearly separable from a sum of per-window features); the best such readouts reach
  about 75% for ``n_values=2``, 2/3 for 4 and tend to 62.5% for many values (by flagging
  "both values in one half of the value set"). A non-linear readout of the pooled bag
  of tokens can detect the repeated value, so "match" is a test of attention range for
  pooled-linear classifiers such as :class:`levyattn.models.TextClassifier`.
- ``kind="order"``: two *different* values ``a != b``; label 1 iff the first tagged token
  has the smaller value (with ``n_values=2``: "does T_0 come before T_1?"). Both labels
  put the same two tagged tokens in the sequence, only their order differs, so any bag
  of tokens or of windows narrower than ``d_min`` is at chance (when ``margin`` is at
  least the window width, so that no window sees a tagged token and an end of the
  sequence at once). Caveat: with *absolute* positional embeddings a local model can
  read the order off the two positions (score ``position(T_1) - position(T_0)``), so
  use "order" for position-free or relative-position models.

Chance level is 50% for both kinds (labels are balanced in expectation).
Determinism: item ``i`` of a split depends only on ``(seed, split, i)`` and the task
parameters (numpy's ``SeedSequence``), so the first 100 items are the same whatever
``n_train`` is, and train and test never share a generator stream.
"""

from __future__ import annotations

import numpy as np
import torch

from levyattn.data._common import SequenceClassificationDataset, check_choice, check_float, check_int

KINDS = ("order", "match")
_SPLIT_IDS = {"train": 0, "test": 1}


class MultiscaleTask(SequenceClassificationDataset):
    """One split of the multiscale task (see the module docstring).

    Items ``(input_ids LongTensor (seq_len,), label)``; also ``positions`` (N, 2) long
    (the two tagged positions, first < second), ``distances`` (N,), ``chance`` (0.5),
    ``token_names`` and ``params`` (the generator's arguments).
    """

    def __init__(
        self,
        n: int,
        *,
        split: str = "train",
        seq_len: int = 64,
        d_min: int = 16,
        d_max: int = 48,
        kind: str = "match",
        n_values: int = 4,
        n_noise: int = 16,
        distractor_rate: float = 0.1,
        margin: int = 4,
        seed: int = 0,
    ) -> None:
        n = check_int("n", n, 1)
        check_choice("split", split, tuple(_SPLIT_IDS))
        check_choice("kind", kind, KINDS)
        seq_len = check_int("seq_len", seq_len, 4)
        margin = check_int("margin", margin, 0)
        d_min = check_int("d_min", d_min, 1)
        max_d = seq_len - 1 - 2 * margin
        if max_d < d_min:
            raise ValueError(
                f"seq_len={seq_len} is too short for d_min={d_min} with margin={margin}: "
                f"need seq_len >= d_min + 2 * margin + 1 = {d_min + 2 * margin + 1}"
            )
        d_max = check_int("d_max", d_max, d_min, max_d)
        n_values = check_int("n_values", n_values, 2)
        n_noise = check_int("n_noise", n_noise, 1)
        distractor_rate = check_float("distractor_rate", distractor_rate, 0.0, 1.0)
        seed = check_int("seed", seed, 0)
        self.params = dict(seq_len=seq_len, d_min=d_min, d_max=d_max, kind=kind, n_values=n_values, n_noise=n_noise,
                           distractor_rate=distractor_rate, margin=margin, seed=seed)  # fmt: skip
        K = n_values
        vocab_size = 1 + 2 * K + n_noise
        seqs = np.empty((n, seq_len), dtype=np.int64)
        labels = np.empty(n, dtype=np.int64)
        pos = np.empty((n, 2), dtype=np.int64)
        # The task parameters enter the seed too: changing one gives new sequences, not a
        # reshuffle of old ones; the split id keeps train and test streams apart.
        words = [seed, _SPLIT_IDS[split], seq_len, d_min, d_max, KINDS.index(kind), K, n_noise,
                 int(round(distractor_rate * 1_000_000)), margin]  # fmt: skip
        for i in range(n):
            rng = np.random.default_rng([*words, i])
            label = int(rng.integers(2))
            fill = np.where(
                rng.random(seq_len) < distractor_rate,
                1 + K + rng.integers(K, size=seq_len),  # untagged value
                1 + 2 * K + rng.integers(n_noise, size=seq_len),  # noise
            )
            d = int(rng.integers(d_min, d_max + 1))
            p1 = int(rng.integers(margin, seq_len - margin - d))
            p2 = p1 + d
            if kind == "order":
                a, b = (int(v) for v in rng.choice(K, size=2, replace=False))
                lo, hi = min(a, b), max(a, b)
                first, second = (lo, hi) if label == 1 else (hi, lo)
            else:
                if label == 1:
                    first = second = int(rng.integers(K))
                else:
                    first, second = (int(v) for v in rng.choice(K, size=2, replace=False))
            fill[p1], fill[p2] = 1 + first, 1 + second
            seqs[i], labels[i], pos[i] = fill, label, (p1, p2)
        super().__init__(
            torch.from_numpy(seqs), labels.tolist(), vocab_size=vocab_size, num_classes=2, max_len=seq_len, pad_id=0,
            class_names=("no", "yes"),
        )  # fmt: skip
        self.input_ids = torch.from_numpy(seqs)
        self.positions = torch.from_numpy(pos)
        self.distances = self.positions[:, 1] - self.positions[:, 0]
        self.kind = kind
        self.chance = 0.5
        self.token_names = (
            ["<pad>"] + [f"T{v}" for v in range(K)] + [f"V{v}" for v in range(K)] + [f"N{j}" for j in range(n_noise)]
        )


def make_multiscale_task(
    n_train: int = 2000,
    n_test: int = 1000,
    seq_len: int = 64,
    d_min: int = 16,
    d_max: int = 48,
    *,
    kind: str = "match",
    n_values: int = 4,
    n_noise: int = 16,
    distractor_rate: float = 0.1,
    margin: int = 4,
    seed: int = 0,
) -> tuple[MultiscaleTask, MultiscaleTask]:
    """Train and test splits of the multiscale task (module docstring): ``n_train`` and
    ``n_test`` sequences of ``seq_len`` tokens whose label depends on two tagged tokens
    ``d_min`` to ``d_max`` apart. Deterministic given the arguments; chance is 50%.

    The defaults: 64 tokens, distance 16-48, ``kind="match"`` with 4 values, 10%
    distractors; ``vocab_size`` is ``1 + 2 * n_values + n_noise`` (25 by default).
    """
    common = dict(seq_len=seq_len, d_min=d_min, d_max=d_max, kind=kind, n_values=n_values, n_noise=n_noise,
                  distractor_rate=distractor_rate, margin=margin, seed=seed)  # fmt: skip
    return MultiscaleTask(n_train, split="train", **common), MultiscaleTask(n_test, split="test", **common)


__all__ = ["KINDS", "MultiscaleTask", "make_multiscale_task"]
