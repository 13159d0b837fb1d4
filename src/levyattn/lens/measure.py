"""Measure a model's attention decay ``A(d)``: the mean weight a query puts on the key ``d`` tokens away.

What can be measured
--------------------
``measure_decay(model, ...)`` takes

- any Hugging Face model that can return attention weights (causal LMs with RoPE, ALiBi or
  absolute positions; encoders such as BERT), in memory, as a local directory or ``.gguf``
  file, or as a hub id (downloaded only when the hub is not offline; see :func:`load_hf_model`);
- any ``torch.nn.Module`` following the same calling convention:
  ``model(input_ids=ids, output_attentions=True)`` returns an object (or a mapping) whose
  ``attentions`` is a sequence, one per layer, of (B, H, L, L) weights, row ``i`` being query
  ``i``'s distribution over keys (this is how levyattn's own models plug in);
- or a callable ``attentions_fn(input_ids) -> sequence of (B, H, L, L)`` (``model=None``).

How the weights are read
------------------------
A Hugging Face model that dispatches through transformers' attention functions (Llama,
GPT-2, GPT-NeoX, BERT, Gemma, Mistral and most current architectures) is switched for the
measurement to the registered row-capturing attention (:mod:`levyattn.lens.capture`): its
forward pass keeps fused SDPA for the outputs and only the query rows the protocol reads are
computed as weights (in the log domain, with the model's own masks, scaling, GQA, sliding
window and softcapping), one layer at a time. Peak memory stays near the model's own inference
peak. Other models (e.g. BLOOM, or ``capture="eager"``) run on the eager implementation with
``output_attentions``, every layer's (B, H, L, L) weights materialised; ``info["attention_path"]``
says which path ran ("rows", "eager" or "attentions_fn") and ``info["attention_path_note"]`` why
a Hugging Face model was not on "rows". The model's attention implementation is restored
afterwards. A model whose attention is levyattn's FNA (``attn_implementation="fna"``) is
measured on its FNA weights (the reference kernel with its ``fna_*`` settings), never on a
softmax of its queries and keys (``info["fna_attention"]``); with FNA's density normalisation a
prefix is not computed as the prefix alone, so it gets one pass per distance. A Hugging Face
model with a task head (``*ForCausalLM``, ``*LMHeadModel``, ``*ForMaskedLM``...) is run
through its backbone (``model.base_model``): the head acts after the last layer, so the
attention weights are the same, and its logits are never needed.
``info["forward_module"]`` names the module that ran.

Protocols
---------
``published`` (docs/lens.md): for each distance ``d`` a prompt of length ``d + 50``;
the query is the last position ``L - 1`` and the key ``L - 1 - d``; the weight is averaged over
heads, then layers, then prompts; ``n_prompts`` prompts per seed, seeds 42, 123, 7.
For a causal model positions ``0 .. d + 49`` of a longer sequence are computed exactly as in a
sequence of length ``d + 50``, so ``passes="one"`` (the default for causal models) runs one
forward pass of length ``max(d) + 50`` per prompt and reads query ``d + 49``, key ``49`` for
every ``d``. ``passes="per_distance"`` runs one pass per distance (always for encoders, where
the shortcut is not exact).

``dense``: every query-key pair of each pass of length ``seq_len`` (default ``max(d) + 50``)
with ``|i - j| = d`` for each requested ``d``, averaged over the pairs of each head, then heads,
layers, prompts. :class:`DenseOptions` says which pairs are excluded (key positions of the
attention sink, special tokens) and how rows are normalised; encoders are read in both
directions (key before or after the query), causal models backward.

Prompts
-------
``corpus="random"`` (random token ids as the published tool draws them) or a text file; see
:mod:`levyattn.lens.prompts`. ``prompt_stream="nested"``
(default) draws each prompt once at the longest length and uses its prefix for shorter
distances, so one-pass and per-distance read identical computations; ``"published"`` (per
distance only) restarts the generator at every distance exactly as the published tool,
reproducing its token ids.

The result keeps the value of every prompt so confidence intervals can resample prompts.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from levyattn.lens.attention_paths import (
    AttentionPath,
    eager_path,
    full_matrix_path,
    is_causal_attention,
    row_path,
)
from levyattn.lens.loading import (
    fna_density,
    load_hf_model,
    model_context,
    model_dtype,
    resolve_device,
    resolve_dtype,
    saved_vocabulary,
    uses_fna,
)
from levyattn.lens.options import check_lens_options
from levyattn.lens.prompts import PREFIX, Prompts, check_token_range_fits, make_prompts, special_frame
from levyattn.lens.reductions import dense_values, published_values

__all__ = [
    "PREFIX",
    "PUBLISHED_DISTANCES",
    "PUBLISHED_N_PROMPTS",
    "PUBLISHED_SEEDS",
    "DecayMeasurement",
    "DenseOptions",
    "load_hf_model",
    "measure_decay",
]

PUBLISHED_DISTANCES: tuple[int, ...] = (10, 20, 30, 50, 100, 200, 500, 1000, 2000)
PUBLISHED_SEEDS: tuple[int, ...] = (42, 123, 7)
PUBLISHED_N_PROMPTS = 150


@dataclass(frozen=True)
class DenseOptions:
    """Which pairs the dense protocol keeps and how it normalises them.

    - ``exclude_sink``: the first ``exclude_sink`` positions are never used as keys (1 by
      default: most trained models park mass on token 0, the "attention sink", which would
      otherwise inflate ``A(d)`` at ``d = i`` for every query ``i``); 0 keeps them.
    - ``exclude_special``: pairs whose query or key is a special token of the tokenizer
      (BOS/EOS/CLS/SEP/PAD...) are dropped. The lens never pads (prompts are exact-length
      windows), so a pad token can only come from the text itself and is dropped as special.
    - ``normalize``: "none" averages the softmax weights as returned (like the published
      protocol); "renorm" first rescales every query row to sum to 1 over its kept keys;
      "relative" multiplies each weight by the number of keys the query may attend to (its
      ratio to uniform attention, which makes early and late queries comparable).
    - ``direction``: "backward" (key before the query), "forward" (key after; encoders only),
      "both" (|i - j| = d) or "auto" (backward for causal models, both for encoders).
    - ``seq_len``: the pass length (default ``max(distances) + 50``).
    - ``frame_special``: wrap every prompt in the tokenizer's special tokens, as the model saw
      its inputs in training (``[CLS] ... [SEP]`` for BERT; needs a tokenizer); the pass is then
      that many tokens longer. With ``exclude_special`` the [CLS]/[SEP] rows and columns are
      left out of the average (their weights still shape every row's softmax; ``normalize=
      "renorm"`` takes their mass out); without it they count like any token.
    - ``query_rows``: None reads every query of the pass; n reads n queries evenly spaced over
      the pass (the first and the last included), which bounds the weights computed per layer
      to (B, H, n, L).
    """

    exclude_sink: int = 1
    exclude_special: bool = True
    normalize: str = "none"
    direction: str = "auto"
    seq_len: int | None = None
    frame_special: bool = False
    query_rows: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.exclude_sink, bool) or not isinstance(self.exclude_sink, int) or self.exclude_sink < 0:
            raise ValueError(f"exclude_sink must be an integer >= 0, got {self.exclude_sink!r}")
        if self.normalize not in ("none", "renorm", "relative"):
            raise ValueError(f"normalize must be 'none', 'renorm' or 'relative', got {self.normalize!r}")
        if self.direction not in ("auto", "backward", "forward", "both"):
            raise ValueError(f"direction must be 'auto', 'backward', 'forward' or 'both', got {self.direction!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ValueError(f"seq_len must be an integer >= 2 or None, got {self.seq_len!r}")
        if not isinstance(self.frame_special, bool):
            raise ValueError(f"frame_special must be True or False, got {self.frame_special!r}")
        if self.query_rows is not None and (
            isinstance(self.query_rows, bool) or not isinstance(self.query_rows, int) or self.query_rows < 2
        ):
            raise ValueError(f"query_rows must be an integer >= 2 or None, got {self.query_rows!r}")


@dataclass
class DecayMeasurement:
    """``A(d)`` of one model, with every prompt's value kept.

    Shapes: S seeds, P prompts per seed, Ly layers, H heads, D distances.

    - ``prompt_layer`` (S, P, Ly, D): per prompt and layer, the mean over heads (NaN where a
      prompt did not measure a distance);
    - ``layer_head`` (Ly, H, D): per layer and head, the mean over all prompts;
      ``layer_head_sd`` its standard deviation over prompts;
    - ``sample_counts`` (D,): prompts that measured each distance; ``pair_counts`` (D,): the
      query-key pairs averaged per head and layer, summed over prompts (equal to
      ``sample_counts`` for the published protocol);
    - ``paired``: True when one prompt gave every distance (the bootstrap then resamples a
      prompt's whole curve); False when each distance had its own prompts.
    """

    model_name: str
    protocol: str
    passes: str
    causal: bool
    distances: np.ndarray
    seeds: tuple[int, ...]
    n_prompts: int
    prompt_layer: np.ndarray
    layer_head: np.ndarray
    layer_head_sd: np.ndarray
    sample_counts: np.ndarray
    pair_counts: np.ndarray
    paired: bool
    n_passes: int
    n_tokens: int
    wall_time_s: float
    info: dict = field(default_factory=dict)

    @property
    def prompt_values(self) -> np.ndarray:
        """(S, P, D): each prompt's A(d), mean over heads then layers."""
        with np.errstate(invalid="ignore"), _quiet_nanmean():
            return np.nanmean(self.prompt_layer, axis=2)

    @property
    def per_seed(self) -> np.ndarray:
        """(S, D): mean over each seed's prompts."""
        with _quiet_nanmean():
            return np.nanmean(self.prompt_values, axis=1)

    @property
    def aggregate(self) -> np.ndarray:
        """(D,): the published A(d): heads, then layers, then prompts (then seeds, equal sizes)."""
        with _quiet_nanmean():
            return np.nanmean(self.per_seed, axis=0)

    @property
    def layer_values(self) -> np.ndarray:
        """(Ly, D): per layer, mean over heads then prompts."""
        with _quiet_nanmean():
            return np.nanmean(self.prompt_layer.reshape(-1, *self.prompt_layer.shape[2:]), axis=0)

    @property
    def n_layers(self) -> int:
        return int(self.layer_head.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.layer_head.shape[1])

    def flat_prompt_values(self) -> np.ndarray:
        """(S * P, D): prompts pooled over seeds, for the bootstrap."""
        pv = self.prompt_values
        return pv.reshape(-1, pv.shape[-1])

    def to_dict(self) -> dict:
        """Everything as JSON-ready lists (NaN written as None)."""
        return {
            "model": self.model_name,
            "protocol": self.protocol,
            "passes": self.passes,
            "causal": self.causal,
            "distances": self.distances.tolist(),
            "seeds": list(self.seeds),
            "n_prompts_per_seed": self.n_prompts,
            "aggregate": _jsonable(self.aggregate),
            "per_seed": _jsonable(self.per_seed),
            "per_layer": _jsonable(self.layer_values),
            "per_layer_head": _jsonable(self.layer_head),
            "per_layer_head_sd": _jsonable(self.layer_head_sd),
            "per_prompt": _jsonable(self.prompt_values),
            "sample_counts": self.sample_counts.tolist(),
            "pair_counts": self.pair_counts.tolist(),
            "paired": self.paired,
            "n_passes": self.n_passes,
            "n_tokens": self.n_tokens,
            "wall_time_s": self.wall_time_s,
            "info": self.info,
        }


class _quiet_nanmean:
    """Silence numpy's 'Mean of empty slice' for all-NaN slices (they stay NaN on purpose)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _jsonable(arr: np.ndarray) -> Any:
    return _nan_to_none(np.asarray(arr, dtype=np.float64).tolist())


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# --------------------------------------------------------------------------- the measurement


def _check_distances(
    distances: Sequence[int] | None, context: int | None, protocol: str, dense: DenseOptions
) -> tuple[list[int], list[int]]:
    """The sorted grid (distances checked by :func:`check_lens_options`) and the published distances
    dropped because their sequence does not fit the model's context."""
    explicit = distances is not None
    grid = sorted({int(d) for d in distances}) if distances is not None else list(PUBLISHED_DISTANCES)
    limit = context
    if protocol == "dense" and dense.seq_len is not None:
        if context is not None and dense.seq_len > context:
            raise ValueError(f"dense seq_len={dense.seq_len} exceeds the model's context of {context} positions")
        limit = None
    dropped: list[int] = []
    if limit is not None:
        beyond = [d for d in grid if d + PREFIX > limit]
        if beyond and explicit:
            raise ValueError(
                f"distances {beyond} need sequences of d + {PREFIX} tokens, beyond the model's context of {limit} "
                f"positions; valid distances are 1 .. {limit - PREFIX}"
            )
        dropped = beyond
        grid = [d for d in grid if d + PREFIX <= limit]
        if not grid:
            raise ValueError(f"no published distance fits the model's context of {limit} positions")
    return grid, dropped


def _needs_move(model: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> bool:
    """Whether ``model.to(device, dtype)`` would change any parameter or buffer (dtype: floating ones)."""
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # what a tensor moved to "cuda" reports
    for tensor in [*model.parameters(), *model.buffers()]:
        if device is not None and tensor.device != device:
            return True
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return True
    return False


def measure_decay(
    model: nn.Module | str | os.PathLike | None = None,
    *,
    protocol: str = "published",
    distances: Sequence[int] | None = None,
    n_prompts: int = PUBLISHED_N_PROMPTS,
    seeds: Sequence[int] = PUBLISHED_SEEDS,
    corpus: str | os.PathLike = "random",
    tokenizer: Any = None,
    token_range: tuple[int, int] | None = None,
    passes: str = "auto",
    prompt_stream: str = "nested",
    causal: bool | None = None,
    dense: DenseOptions | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attentions_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    max_positions: int | None = None,
    allow_hub: bool = True,
    capture: str = "auto",
    progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> DecayMeasurement:
    """Measure ``A(d)`` per layer, per head and in aggregate (see the module docstring).

    ``distances=None`` takes the published grid, dropping the distances whose sequence
    (``d + 50`` tokens) does not fit the model's context; explicit distances beyond it are an
    error. ``passes``: "auto" (one pass per prompt for causal models, per distance otherwise),
    "one" or "per_distance" (published protocol only). ``causal=None`` detects causality from
    the weights of a short probe pass (all weights above the diagonal zero). ``batch_size``
    prompts go through the model together. ``capture``: "auto" computes only the attention
    rows the protocol reads, inside the model's fused attention ("rows", Hugging Face models
    that dispatch through transformers' attention functions), else the eager path; "eager"
    forces the eager path (every layer's (B, H, L, L) weights; peak memory about
    ``batch_size * layers * heads * L^2`` weights). ``device``/``dtype``: where and in what
    dtype to measure; a model given in memory that is elsewhere is measured on a moved copy
    (its own weights stay as they are; move it first to spare the memory of the copy). The
    model's train/eval flags are restored after the measurement. ``progress`` shows a tqdm
    bar when stderr is a terminal; ``on_progress(done, total)``
    is called after every pass with the prompts done so far (a prompt counts once per
    distance in per-distance mode).
    """
    dense = dense or DenseOptions()
    if not isinstance(dense, DenseOptions):
        raise TypeError(f"dense must be a DenseOptions, got {type(dense).__name__}")
    check_lens_options(
        protocol=protocol,
        passes=passes,
        prompt_stream=prompt_stream,
        capture=capture,
        distances=distances,
        n_prompts=n_prompts,
        seeds=seeds,
        batch_size=batch_size,
        corpus=corpus,
        token_range=token_range,
        seq_len=dense.seq_len if protocol == "dense" else None,
    )
    seeds = tuple(seeds)

    t_start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if model is None and attentions_fn is None:
        raise TypeError("give a model (nn.Module, directory or hub id) or attentions_fn")
    load_info: dict[str, Any] = {}
    restore_modes: Callable[[], Any] = lambda: None  # noqa: E731
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        saved_vocab = saved_vocabulary(model) if token_range is not None and corpus == "random" else None
        if saved_vocab is not None:  # before the weights load (seconds to minutes)
            check_token_range_fits(tuple(token_range), saved_vocab, "config.vocab_size")
        model, loaded_tok = load_hf_model(model, device=dev, dtype=torch_dtype, allow_hub=allow_hub)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
        load_info = {"load": model.lens_load_info}
    elif model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, a directory or a hub id, got {type(model).__name__}")
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", "") or type(model).__name__
        if _needs_move(model, dev, torch_dtype):
            # the caller's model keeps its dtype and device: the measurement runs on a copy
            model = copy.deepcopy(model).to(device=dev, dtype=torch_dtype)
        else:
            modes = [(module, module.training) for module in model.modules()]
            restore_modes = lambda: [module.train(mode) for module, mode in modes]  # noqa: E731
        model.eval()
    else:
        name = getattr(attentions_fn, "__name__", "attentions_fn")

    if model is not None:
        param = next(iter(model.parameters()), None)
        run_device = param.device if param is not None else (dev or torch.device("cpu"))
    else:
        run_device = dev or torch.device("cpu")

    restore: Callable[[], None] = lambda: None  # noqa: E731
    try:
        context = model_context(model, max_positions)
        grid, dropped = _check_distances(distances, context, protocol, dense)
        prompts, corpus_info = make_prompts(corpus, tokenizer, model, token_range)
        if prompts.stream is not None:  # the window lengths the passes will draw
            if protocol == "dense":
                lengths = [dense.seq_len or max(grid) + PREFIX]
            else:
                lengths = [d + PREFIX for d in grid] if prompt_stream == "published" else [max(grid) + PREFIX]
            corpus_info["corpus_windows"] = [prompts.check_distinct(seeds, n_prompts, n) for n in lengths]
        probe = torch.as_tensor(prompts.draw(0, 1, 16), device=run_device)
        prefix_exact = not (model is not None and fna_density(model))  # read before the path switches the attention
        with torch.inference_mode():
            if attentions_fn is not None:
                attention = AttentionPath(full_matrix_path(attentions_fn, name), "attentions_fn", "attentions_fn")
            elif capture == "eager":
                attention, restore = eager_path(model, name, "capture='eager' was asked for")  # type: ignore[arg-type]
            else:
                attention, restore = row_path(model, name, probe)  # type: ignore[arg-type]
            is_causal = is_causal_attention(attention, probe) if causal is None else bool(causal)
            plan = _Plan(
                name=name,
                protocol=protocol,
                grid=grid,
                n_prompts=n_prompts,
                seeds=seeds,
                prompts=prompts,
                passes=passes,
                prompt_stream=prompt_stream,
                causal=is_causal,
                dense=dense,
                batch_size=batch_size,
                device=run_device,
                tokenizer=tokenizer,
                context=context,
                prefix_exact=prefix_exact,
            )
            result = _run(attention, plan, progress, on_progress)
    finally:
        restore()
        restore_modes()  # train/eval flags of every submodule, as the caller left them
    result.wall_time_s = time.perf_counter() - t_start
    result.info.update(corpus_info)
    result.info.update(load_info)
    result.info.update(
        {
            "context": context,
            "dropped_distances": dropped,
            "device": str(run_device),
            "dtype": str(torch_dtype or model_dtype(model)),
            "causal_detected": causal is None,
            "prefix": PREFIX,
            "forward_module": attention.forward_module,
            "attention_path": attention.path,
            "attention_path_note": attention.note,
            "fna_attention": model is not None and uses_fna(model),
        }
    )
    return result


@dataclass
class _Plan:
    """What one measurement runs: the checked arguments of :func:`measure_decay`."""

    name: str
    protocol: str
    grid: list[int]
    n_prompts: int
    seeds: tuple[int, ...]
    prompts: Prompts
    passes: str
    prompt_stream: str
    causal: bool
    dense: DenseOptions
    batch_size: int
    device: Any
    tokenizer: Any
    context: int | None
    #: whether a prefix of a pass is computed as that prefix alone would be (False: FNA's density
    #: normalisation, whose column sums include later queries)
    prefix_exact: bool = True

    def mode(self) -> str:
        """The pass mode: one, per_distance or dense; refuses combinations that are not exact."""
        if self.protocol == "dense":
            if self.prompt_stream == "published":
                raise ValueError("prompt_stream='published' applies to the published protocol only")
            return "dense"
        one = self.causal and self.prefix_exact
        passes = self.passes if self.passes != "auto" else ("one" if one else "per_distance")
        if passes == "one" and not self.causal:
            raise ValueError("passes='one' is exact only for causal models; this model is bidirectional")
        if passes == "one" and not self.prefix_exact:
            raise ValueError(
                "passes='one' is not exact for this model: its FNA density normalisation (fna_density_a > 0) sums "
                "each key's column over every query, later ones included; use passes='per_distance'"
            )
        if self.prompt_stream == "published" and passes == "one":
            raise ValueError("prompt_stream='published' restarts the generator per distance; use passes='per_distance'")
        return passes

    def direction(self) -> str:
        d = self.dense.direction if self.dense.direction != "auto" else ("backward" if self.causal else "both")
        if self.causal and d != "backward":
            raise ValueError(f"direction={self.dense.direction!r} reads keys after the query; this model is causal")
        return d

    def frame(self, ids: np.ndarray) -> np.ndarray:
        """(n, L) dense prompts -> (n, L + k) wrapped in the tokenizer's special tokens when asked."""
        if not self.dense.frame_special:
            return ids
        before, after = special_frame(self.tokenizer)
        n = ids.shape[0]
        framed = np.concatenate([np.tile(before, (n, 1)), ids, np.tile(after, (n, 1))], axis=1).astype(np.int64)
        if self.context is not None and framed.shape[1] > self.context:
            raise ValueError(
                f"a dense pass of {ids.shape[1]} tokens framed in special tokens has {framed.shape[1]}, beyond the "
                f"model's context of {self.context} positions; lower seq_len or the distances"
            )
        return framed

    def dense_rows(self, length: int) -> torch.Tensor:
        """The query positions a dense pass reads: all, or ``query_rows`` evenly spaced."""
        if self.dense.query_rows is None or self.dense.query_rows >= length:
            return torch.arange(length)
        return torch.linspace(0, length - 1, self.dense.query_rows).round().long().unique()

    def special_ids(self) -> list[int]:
        if self.protocol != "dense" or not self.dense.exclude_special or self.tokenizer is None:
            return []
        return sorted({int(t) for t in getattr(self.tokenizer, "all_special_ids", []) or []})


class _Accumulator:
    """Per-prompt layer means and running per-head sums of the values of every pass."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.prompt_layer: np.ndarray | None = None
        self.lh_sum = self.lh_sq = self.lh_n = np.zeros(0)

    def store(self, s: int, p0: int, vals: np.ndarray, cols: slice) -> None:
        """vals (B, Ly, H, len(cols)) of prompts p0 .. p0 + B - 1 of seed number s."""
        b, ly, h = vals.shape[:3]
        n_d = len(self.plan.grid)
        if self.prompt_layer is None:
            self.prompt_layer = np.full((len(self.plan.seeds), self.plan.n_prompts, ly, n_d), np.nan)
            self.lh_sum, self.lh_sq, self.lh_n = (np.zeros((ly, h, n_d)) for _ in range(3))
        if self.prompt_layer.shape[2] != ly or self.lh_sum.shape[1] != h:
            raise ValueError(f"{self.plan.name} changed its number of layers/heads between passes: {ly}x{h}")
        with _quiet_nanmean():
            self.prompt_layer[s, p0 : p0 + b, :, cols] = np.nanmean(vals, axis=2)
        ok = np.isfinite(vals)
        v0 = np.where(ok, vals, 0.0)
        self.lh_sum[:, :, cols] += v0.sum(0)
        self.lh_sq[:, :, cols] += (v0**2).sum(0)
        self.lh_n[:, :, cols] += ok.sum(0)


def _run(
    attention: AttentionPath, plan: _Plan, progress: bool, on_progress: Callable[[int, int], None] | None
) -> DecayMeasurement:
    from tqdm.auto import tqdm

    grid, n_d = plan.grid, len(plan.grid)
    mode = plan.mode()
    direction = plan.direction() if mode == "dense" else None
    special = plan.special_ids()
    total = len(plan.seeds) * plan.n_prompts * (n_d if mode == "per_distance" else 1)
    # disable=None: a bar only when stderr is a terminal, so piped logs carry no redraws
    bar = tqdm(total=total, disable=None if progress else True, desc=f"lens {plan.protocol} ({mode})",
               unit="prompt", leave=False)  # fmt: skip
    acc = _Accumulator(plan)
    pair_counts = np.zeros(n_d)
    n_passes = n_tokens = done = 0

    def forward(ids: np.ndarray, rows: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """One pass; (B, Ly, H, D') of ``reduce`` applied to each layer's rows."""
        nonlocal n_passes, n_tokens, done
        per_layer: list[torch.Tensor] = []
        attention.run(torch.as_tensor(ids, device=plan.device), rows, lambda a: per_layer.append(reduce(a)))
        n_passes += 1
        n_tokens += ids.size
        done += ids.shape[0]
        bar.update(ids.shape[0])
        if on_progress is not None:
            on_progress(done, total)
        return torch.stack(per_layer, 1).cpu().numpy()

    try:
        for s, seed in enumerate(plan.seeds):
            if mode in ("one", "dense"):
                length = (plan.dense.seq_len or max(grid) + PREFIX) if mode == "dense" else max(grid) + PREFIX
                all_ids = plan.prompts.draw(int(seed), plan.n_prompts, length)
                if mode == "dense":
                    all_ids = plan.frame(all_ids)
                for p0 in range(0, plan.n_prompts, plan.batch_size):
                    ids = all_ids[p0 : p0 + plan.batch_size]
                    if mode == "one":
                        # query d + PREFIX - 1, key PREFIX - 1: the last query of the length-(d + PREFIX) prefix
                        rows = torch.as_tensor([d + PREFIX - 1 for d in grid])
                        vals = forward(ids, rows, lambda a: published_values(a, [PREFIX - 1] * n_d))
                        pair_counts += ids.shape[0]
                    else:
                        ids_t = torch.as_tensor(ids, device=plan.device)
                        query_ok = torch.ones_like(ids_t, dtype=torch.bool)
                        if special:
                            query_ok &= ~torch.isin(ids_t, torch.as_tensor(special, device=ids_t.device))
                        key_ok = query_ok.clone()
                        key_ok[:, : plan.dense.exclude_sink] = False
                        rows = plan.dense_rows(ids.shape[1])
                        counts: list[torch.Tensor] = []

                        def reduce(a: torch.Tensor, rows=rows, q=query_ok, k=key_ok, counts=counts) -> torch.Tensor:
                            means, n = dense_values(a, rows, grid, q, k, plan.causal, plan.dense.normalize, direction)
                            counts.append(n)
                            return means

                        vals = forward(ids, rows, reduce)
                        pair_counts += counts[0].sum(0).cpu().numpy()
                    acc.store(s, p0, vals, slice(None))
            else:  # one pass per distance
                draw = functools.partial(plan.prompts.draw, int(seed), plan.n_prompts)
                nested = draw(max(grid) + PREFIX) if plan.prompt_stream == "nested" else None
                for col, d in enumerate(grid):
                    length = d + PREFIX
                    ids_d = nested[:, :length] if nested is not None else draw(length)
                    last = torch.as_tensor([length - 1])
                    for p0 in range(0, plan.n_prompts, plan.batch_size):
                        ids = np.ascontiguousarray(ids_d[p0 : p0 + plan.batch_size])
                        vals = forward(ids, last, lambda a, key=length - 1 - d: published_values(a, [key]))
                        pair_counts[col] += ids.shape[0]
                        acc.store(s, p0, vals, slice(col, col + 1))
    finally:
        bar.close()

    assert acc.prompt_layer is not None
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = acc.lh_sum / acc.lh_n
        var = np.maximum(acc.lh_sq / acc.lh_n - mean**2, 0.0) * acc.lh_n / np.maximum(acc.lh_n - 1, 1)
    sample_counts = np.isfinite(acc.prompt_layer).any(axis=2).sum(axis=(0, 1)).astype(np.int64)
    info: dict[str, Any] = {"prompt_stream": plan.prompt_stream if plan.protocol == "published" else "nested"}
    if plan.protocol == "dense":
        info["dense"] = {**asdict(plan.dense), "direction_used": direction, "n_special_ids": len(special)}
    return DecayMeasurement(
        model_name=plan.name,
        protocol=plan.protocol,
        passes=mode,
        causal=plan.causal,
        distances=np.asarray(grid, dtype=np.int64),
        seeds=tuple(int(s) for s in plan.seeds),
        n_prompts=plan.n_prompts,
        prompt_layer=acc.prompt_layer,
        layer_head=mean,
        layer_head_sd=np.sqrt(var),
        sample_counts=sample_counts,
        pair_counts=pair_counts,
        paired=mode in ("one", "dense") or plan.prompt_stream == "nested",
        n_passes=n_passes,
        n_tokens=n_tokens,
        wall_time_s=0.0,
        info=info,
    )
