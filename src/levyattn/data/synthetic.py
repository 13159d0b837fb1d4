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

- ``kind="nearest"`` (multiscale nearest marker): one extra *query* token ``Q`` (the last
  id of the vocabulary) and two tagged markers of different values ``a < b``, at
  distances ``d_a != d_b`` from ``Q`` (each on a random side), each drawn
  *log-uniformly* from ``[d_min, d_max]`` so that the two gaps range over every scale
  from neighbours to half the sequence; label 1 iff the smaller-valued marker is the
  nearer one. Every item holds the same tokens (``Q``, ``T_a``, ``T_b``) whatever its
  label, so any bag of tokens is at chance; only the *comparison of two positional
  gaps* decides, and it must work at every scale at once: 1 vs 2 tokens and 30 vs 40
  tokens alike. What a kernel's shape does here: a distance kernel sees a gap through the
  positions' geometry. With Brownian positions (squared distance ~ gap,
  :func:`levyattn.models.common.brownian_positions`) alpha = 2 weighs a marker by
  ``exp(-gap / eps)`` (times a learned content factor): log-ratio -1 between gaps 1 and 2,
  -10 between 30 and 40, -40 between 150 and 190 at eps = 1, so near pairs are barely
  told apart and far markers get vanishing weight and gradient. The power law of alpha < 2
  weighs it by ``(1 + sqrt(gap) / eps^(1/alpha))^-(d + alpha)``: log-ratios -6.2, -4.1 and
  -3.6 for the same pairs at d = 32, nearly the same at every scale. Any monotone kernel
  can solve the task in principle (only the sign of the two weights' difference matters),
  so the difference shows in training and in accuracy at the extremes, not as a hard
  limit; with the standard sinusoidal positions (squared distance ~ log(gap)) the ranking
  reverses. Measured in experiments/RESULTS.md (presets ``multiscale-nearest-1layer``,
  ``multiscale-nearest-brownian-1layer``, ``multiscale-nearest-brownian-256-1layer``).
  ``positions`` holds the two markers' positions (sorted), ``query_positions`` the
  query's and ``marker_distances`` (N, 2) the gaps of ``T_a`` and ``T_b``.
- ``kind="ratio"`` (scale-free comparison): as "nearest", a query ``Q`` and two markers of
  values ``a < b``, but ``T_a`` is always the nearer, at gap ``g_a``, and ``T_b`` at
  ``g_a < g_b <= ratio**2 * g_a``; label 1 iff ``g_b >= ratio * g_a``: *is the farther marker
  at least ``ratio`` times as far as the nearer?* Both gaps are log-uniform in
  ``[d_min, d_max]`` (drawn together and redrawn until they fit the label), so the same
  threshold on the ratio of the gaps decides at every scale, 4 vs 5 tokens and 32 vs 40
  alike. Marker a is always the nearer, so which is nearer says nothing, and every item
  holds the same tokens. Why this separates kernel shapes, at the query: a distance
  kernel's weights give the query ``w_a / w_b``, and with Brownian positions (squared
  distance ~ gap) the Gaussian of alpha = 2, and softmax's dot product, make
  ``log(w_a / w_b)`` an affine function of the *difference* ``g_b - g_a`` (learned content
  terms add constants, up to their cross terms with the positions), while the power law of
  alpha < 2 makes it ``(d + alpha) * log((1 + sqrt(g_b)) / (1 + sqrt(g_a)))``, close to a
  function of the *ratio* (content terms shift the square roots). The label is a
  threshold on the ratio; the difference decides it only in part (``g_b - g_a = 4`` is
  label 1 at gaps 8, 12 and label 0 at 20, 24). Read out through one threshold on the
  query's ``log(w_a / w_b)``, the best accuracy on the preset's test data is 0.76 for the
  Gaussian and softmax (0.70 for any rule on the integer difference; the approximate
  Brownian geometry adds a little) and 0.97 for the power law at alpha 1.2
  (``experiments/ratio_bounds.py``). These are not bounds on a trained model: the markers'
  own rows see the query at their gaps, the values mix vectors, the feed-forward layer is
  non-linear, and trained models were measured to rely on no single weight ratio (the same
  readout on their query rows: 0.51-0.81). What they reach is measured in
  experiments/RESULTS.md (preset ``multiscale-ratio-brownian-1layer``). ``ratio`` is used by
  this kind only.
- ``kind="majority"`` (multiscale majority vote): a *query* token ``Q_v`` carrying a value
  ``v`` and ``n_markers`` (odd, M) tagged markers, each at its own gap from the query drawn
  log-uniformly from ``[d_min, d_max]`` (random side, distinct positions); one value ``w``
  holds the barest strict majority, ``(M + 1) / 2`` markers at random places among the M,
  and the other ``(M - 1) / 2`` take values other than ``w``. Label 1 iff ``w == v``: the
  query's value agrees with the markers' majority. The label is a relation between the
  query and markers at every distance at once, so evidence must be gathered over all
  scales: a model that relates the query only to its nearest marker is right about 72% of
  the time, one that takes the majority of the nearest three about 81% (measured, M = 7,
  4 values). The query alone and the markers' histogram alone are independent of the
  label (``v`` uniform, ``w`` uniform given nothing else); as for "match", a pooled-linear
  readout of per-token (or per-narrow-window) features can still reach the "match" bound
  (75% for ``n_values=2``, less for more values) because ``[w == v]`` is an equality test.
  Queries are ids ``2K+n_noise+1 .. 3K+n_noise`` (``Q0 ..``); ``positions`` holds the
  markers' positions (sorted, (N, M)), ``marker_values`` their values and
  ``marker_distances`` their gaps from the query, both in position order,
  ``query_positions`` the query's and ``query_values`` ``v``.

Chance level is 50% for all kinds (labels are balanced in expectation).
Determinism: item ``i`` of a split depends only on ``(seed, split, i)`` and the task
parameters (numpy's ``SeedSequence``), so the first 100 items are the same whatever
``n_train`` is, and train and test never share a generator stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from levyattn.data._common import SequenceClassificationDataset, check_choice, check_float, check_int

KINDS = ("order", "match", "nearest", "majority", "ratio")
_SPLIT_IDS = {"train": 0, "test": 1}


class MultiscaleTask(SequenceClassificationDataset):
    """One split of the multiscale task (see the module docstring).

    Items ``(input_ids LongTensor (seq_len,), label)``; also ``positions`` (N, M) long
    (the tagged positions, sorted; M = 2, or ``n_markers`` for "majority"),
    ``distances`` (N,) (last minus first tagged position), ``chance`` (0.5),
    ``token_names`` and ``params`` (the generator's arguments). ``n_markers`` is used by
    "majority" only.
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
        n_markers: int = 5,
        ratio: float = 1.25,
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
        d_max = check_int("d_max", d_max, d_min + 1 if kind in ("nearest", "ratio") else d_min, max_d)
        n_values = check_int("n_values", n_values, 2)
        n_noise = check_int("n_noise", n_noise, 1)
        distractor_rate = check_float("distractor_rate", distractor_rate, 0.0, 1.0)
        n_markers = check_int("n_markers", n_markers, 3, d_max - d_min + 1 if kind == "majority" else None)
        if n_markers % 2 == 0:
            raise ValueError(f"n_markers must be odd (a strict majority always exists), got {n_markers}")
        ratio = check_float("ratio", ratio, 1.0, math.inf, lo_open=True, hi_open=True)
        if kind == "ratio":
            _check_ratio_pairs(d_min, d_max, ratio)
        seed = check_int("seed", seed, 0)
        self.params = dict(seq_len=seq_len, d_min=d_min, d_max=d_max, kind=kind, n_values=n_values, n_noise=n_noise,
                           distractor_rate=distractor_rate, margin=margin, n_markers=n_markers, ratio=ratio,
                           seed=seed)  # fmt: skip
        K = n_values
        n_queries = {"nearest": 1, "ratio": 1, "majority": K}.get(kind, 0)
        vocab_size = 1 + 2 * K + n_noise + n_queries
        query_id = 1 + 2 * K + n_noise  # the first query token ("nearest", "ratio", "majority")
        m = n_markers if kind == "majority" else 2
        seqs = np.empty((n, seq_len), dtype=np.int64)
        labels = np.empty(n, dtype=np.int64)
        pos = np.empty((n, m), dtype=np.int64)
        qpos = np.full(n, -1, dtype=np.int64)
        qval = np.full(n, -1, dtype=np.int64)
        gaps = np.zeros((n, m), dtype=np.int64)
        mval = np.zeros((n, m), dtype=np.int64)
        # The task parameters enter the seed too: changing one gives new sequences, not a
        # reshuffle of old ones; the split id keeps train and test streams apart. (n_markers
        # only for "majority", so that the other kinds keep their sequences.)
        words = [seed, _SPLIT_IDS[split], seq_len, d_min, d_max, KINDS.index(kind), K, n_noise,
                 int(round(distractor_rate * 1_000_000)), margin]  # fmt: skip
        words += [n_markers] if kind == "majority" else []
        words += [int(round(ratio * 1_000_000))] if kind == "ratio" else []
        for i in range(n):
            rng = np.random.default_rng([*words, i])
            label = int(rng.integers(2))
            fill = np.where(
                rng.random(seq_len) < distractor_rate,
                1 + K + rng.integers(K, size=seq_len),  # untagged value
                1 + 2 * K + rng.integers(n_noise, size=seq_len),  # noise
            )
            if kind in ("nearest", "ratio"):
                a, b = sorted(int(v) for v in rng.choice(K, size=2, replace=False))
                if kind == "nearest":
                    q, (pa, pb), (da, db) = _place_nearest(rng, label, seq_len, d_min, d_max, margin)
                else:
                    q, (pa, pb), (da, db) = _place_ratio(rng, label, seq_len, d_min, d_max, margin, ratio)
                fill[q], fill[pa], fill[pb] = query_id, 1 + a, 1 + b
                seqs[i], labels[i], pos[i], qpos[i], gaps[i] = fill, label, sorted((pa, pb)), q, (da, db)
                continue
            if kind == "majority":
                v = int(rng.integers(K))
                w = v if label == 1 else int(rng.choice([u for u in range(K) if u != v]))
                count = (m + 1) // 2
                others = rng.choice([u for u in range(K) if u != w], size=m - count)
                values = rng.permutation(np.concatenate([np.full(count, w), others]).astype(np.int64))
                q, places = _place_majority(rng, m, seq_len, d_min, d_max, margin)
                places = np.asarray(places)
                fill[q], fill[places] = query_id + v, 1 + values
                seqs[i], labels[i], pos[i], qpos[i], qval[i] = fill, label, places, q, v
                gaps[i], mval[i] = np.abs(places - q), values
                continue
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
        self.distances = self.positions[:, -1] - self.positions[:, 0]
        self.query_positions = torch.from_numpy(qpos)
        self.query_values = torch.from_numpy(qval)
        self.marker_distances = torch.from_numpy(gaps)
        self.marker_values = torch.from_numpy(mval)
        self.kind = kind
        self.chance = 0.5
        queries = {"nearest": ["Q"], "ratio": ["Q"], "majority": [f"Q{v}" for v in range(K)]}.get(kind, [])
        self.token_names = (
            ["<pad>"]
            + [f"T{v}" for v in range(K)]
            + [f"V{v}" for v in range(K)]
            + [f"N{j}" for j in range(n_noise)]
            + queries
        )


def _log_uniform_gap(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi] with log-uniform density (every scale equally likely)."""
    return min(hi, int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))))


def _place_nearest(
    rng: np.random.Generator, label: int, seq_len: int, d_min: int, d_max: int, margin: int
) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Query position, positions of markers a and b, and their gaps for one "nearest" item.

    Two distinct log-uniform gaps; the nearer goes to marker a when ``label`` is 1.
    """

    def gaps() -> tuple[int, int]:
        while True:
            g1, g2 = _log_uniform_gap(rng, d_min, d_max), _log_uniform_gap(rng, d_min, d_max)
            if g1 != g2:
                near, far = min(g1, g2), max(g1, g2)
                return (near, far) if label == 1 else (far, near)

    return _place_two_markers(rng, gaps, seq_len, margin)


def _place_ratio(
    rng: np.random.Generator, label: int, seq_len: int, d_min: int, d_max: int, margin: int, ratio: float
) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Query position, positions of markers a and b, and their gaps for one "ratio" item.

    Two log-uniform gaps ``near < far <= ratio**2 * near``, redrawn until ``far >= ratio * near``
    is ``label``; marker a takes the nearer. ``_check_ratio_pairs`` has made sure that both
    labels have such pairs, so the loop ends.
    """

    def gaps() -> tuple[int, int]:
        while True:
            g1, g2 = _log_uniform_gap(rng, d_min, d_max), _log_uniform_gap(rng, d_min, d_max)
            near, far = min(g1, g2), max(g1, g2)
            if near < far <= ratio * ratio * near and (far >= ratio * near) == bool(label):
                return near, far

    return _place_two_markers(rng, gaps, seq_len, margin)


def _check_ratio_pairs(d_min: int, d_max: int, ratio: float) -> None:
    """Raise unless gaps in ``[d_min, d_max]`` give "ratio" items of both labels."""
    pairs = [(n, f) for n in range(d_min, d_max + 1) for f in range(n + 1, min(d_max, int(ratio * ratio * n)) + 1)]
    if not any(f >= ratio * n for n, f in pairs) or not any(f < ratio * n for n, f in pairs):
        raise ValueError(
            f"ratio={ratio} with gaps d_min={d_min} to d_max={d_max} cannot give both labels: need integer gaps "
            f"near < far <= ratio**2 * near with far >= ratio * near for some and far < ratio * near for others "
            f"(raise d_min or d_max, or move ratio towards (d_min + 1) / d_min)"
        )


def _place_two_markers(
    rng: np.random.Generator, draw_gaps: Callable[[], tuple[int, int]], seq_len: int, margin: int
) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Query position, positions of markers a and b, and their gaps ``draw_gaps()``.

    Each marker goes on a random side of the query among the sides that fit inside the
    margins; a draw that does not fit (or puts both markers on one position) is redrawn,
    gaps included, which terminates because ``d_max <= seq_len - 1 - 2 * margin`` (checked
    by the caller).
    """
    lo, hi = margin, seq_len - 1 - margin
    while True:
        da, db = draw_gaps()
        q = int(rng.integers(lo, hi + 1))
        placed = []
        for g in (da, db):
            sides = [s for s in (-1, 1) if lo <= q + s * g <= hi]
            placed.append(q + int(rng.choice(sides)) * g if sides else None)
        if None not in placed and placed[0] != placed[1]:
            return q, (placed[0], placed[1]), (da, db)


def _place_majority(
    rng: np.random.Generator, m: int, seq_len: int, d_min: int, d_max: int, margin: int
) -> tuple[int, list[int]]:
    """Query position and ``m`` distinct marker positions for one "majority" item.

    Each marker's gap is log-uniform in ``[d_min, d_max]``, its side random among the sides
    that fit inside the margins; a gap that fits nowhere or lands on a taken position is
    redrawn. The query is redrawn until at least ``m`` positions lie within reach, so the
    loop ends (every gap in range has positive probability).
    """
    lo, hi = margin, seq_len - 1 - margin
    while True:
        q = int(rng.integers(lo, hi + 1))
        if sum(d_min <= abs(p - q) <= d_max for p in range(lo, hi + 1)) >= m:
            break
    taken: set[int] = set()
    while len(taken) < m:
        g = _log_uniform_gap(rng, d_min, d_max)
        sides = [s for s in (-1, 1) if lo <= q + s * g <= hi and q + s * g not in taken]
        if sides:
            taken.add(q + int(rng.choice(sides)) * g)
    return q, sorted(taken)


def make_multiscale_task(
    n_train: int = 2000, n_test: int = 1000, **options: Any
) -> tuple[MultiscaleTask, MultiscaleTask]:
    """Train and test splits of the multiscale task (module docstring): ``n_train`` and
    ``n_test`` sequences whose label depends on two tagged tokens. ``options`` are
    :class:`MultiscaleTask`'s keyword arguments (``seq_len``, ``d_min``, ``d_max``, ``kind``,
    ``n_values``, ``n_noise``, ``distractor_rate``, ``margin``, ``n_markers``, ``ratio``,
    ``seed``), validated there. Deterministic given the arguments; chance is 50%.

    The defaults: 64 tokens, distance 16-48, ``kind="match"`` with 4 values, 10%
    distractors; ``vocab_size`` is ``1 + 2 * n_values + n_noise`` (25 by default).
    """
    return MultiscaleTask(n_train, split="train", **options), MultiscaleTask(n_test, split="test", **options)


__all__ = ["KINDS", "MultiscaleTask", "make_multiscale_task"]
