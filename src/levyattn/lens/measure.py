"""Measure a model's attention decay ``A(d)``: the mean weight a query puts on the key ``d`` tokens away.

What can be measured
--------------------
``measure_decay(model, ...)`` takes

- any Hugging Face model that can return attention weights (causal LMs with RoPE, ALiBi or
  absolute positions; encoders such as BERT), in memory, as a local directory, or as a hub
  id (only when the network answers; see :func:`load_hf_model`);
- any ``torch.nn.Module`` following the same calling convention:
  ``model(input_ids=ids, output_attentions=True)`` returns an object (or a mapping) whose
  ``attentions`` is a sequence, one per layer, of (B, H, L, L) weights, row ``i`` being query
  ``i``'s distribution over keys (this is how levyattn's own models plug in);
- or a callable ``attentions_fn(input_ids) -> sequence of (B, H, L, L)`` (``model=None``).

A Hugging Face model whose attention implementation is fused (sdpa, flash) cannot return
weights: it is switched to ``eager`` for the measurement and switched back afterwards, or
refused with the reason when it cannot be switched. A Hugging Face model with a task head
(``*ForCausalLM``, ``*LMHeadModel``, ``*ForMaskedLM``...) is run through its backbone
(``model.base_model``): the head acts after the last layer, so the attention weights are the
same, and its logits (L x vocabulary per prompt, the largest matmul of many small models) are
never needed. ``info["forward_module"]`` names the module that ran.

Protocols
---------
``published`` (docs/lens.md, "What is measured"): for each distance ``d`` a prompt of length ``d + 50``;
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
``corpus="random"``: token ids drawn uniformly from ``[1000, min(V - 1, 49000)]`` (V the
tokenizer's ``vocab_size`` as published, else the config's) with Python's
``random.Random(seed).randint``, as the published tool does. ``prompt_stream="nested"``
(default) draws each prompt once at the longest length and uses its prefix for shorter
distances, so one-pass and per-distance read identical computations; ``"published"`` (per
distance only) restarts the generator at every distance exactly as the published tool,
reproducing its token ids. ``corpus=PATH``: a UTF-8 text file tokenised with the model's
tokenizer (no special tokens added); each prompt is a window of consecutive tokens at an
offset drawn with ``random.Random(seed)``.

The result keeps the value of every prompt so confidence intervals can resample prompts.
"""

from __future__ import annotations

import math
import os
import random
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from levyattn.io import read_text

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
#: Tokens before the key in the published protocol: the sequence for distance d has d + PREFIX tokens.
PREFIX = 50
TOKEN_LOW = 1000
TOKEN_HIGH_CAP = 49_000

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


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
    """

    exclude_sink: int = 1
    exclude_special: bool = True
    normalize: str = "none"
    direction: str = "auto"
    seq_len: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.exclude_sink, bool) or not isinstance(self.exclude_sink, int) or self.exclude_sink < 0:
            raise ValueError(f"exclude_sink must be an integer >= 0, got {self.exclude_sink!r}")
        if self.normalize not in ("none", "renorm", "relative"):
            raise ValueError(f"normalize must be 'none', 'renorm' or 'relative', got {self.normalize!r}")
        if self.direction not in ("auto", "backward", "forward", "both"):
            raise ValueError(f"direction must be 'auto', 'backward', 'forward' or 'both', got {self.direction!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ValueError(f"seq_len must be an integer >= 2 or None, got {self.seq_len!r}")


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


# --------------------------------------------------------------------------- model loading


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_hf_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_hub: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a Hugging Face model (eager attention) and its tokenizer (None if it has none).

    Offline first: an existing directory is loaded with ``local_files_only``; any other string
    must be a hub id, looked up in the local cache first and fetched only when ``allow_hub``,
    ``HF_HUB_OFFLINE`` is unset and huggingface.co answers; otherwise FileNotFoundError says
    why. Encoder-decoder models are refused (pass their encoder module instead).
    """
    from levyattn._extras import require

    require("hf", "transformers", purpose="loading a Hugging Face model")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    text = os.fspath(source)
    path = Path(text)
    torch_dtype = _resolve_dtype(dtype)
    if path.is_dir():
        local = True
    elif path.exists():
        raise ValueError(f"model {text!r} is a file; give a model directory or a hub id")
    elif not _HUB_ID.match(text) or text.count("/") > 1:
        raise FileNotFoundError(f"model {text!r}: no such directory, and not a valid Hugging Face hub id")
    else:
        local = False

    def _load(local_only: bool) -> tuple[Any, Any]:
        config = AutoConfig.from_pretrained(text, local_files_only=local_only)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"model {text!r} is an encoder-decoder ({type(config).__name__}); the lens measures one stack: "
                "load it yourself and pass model.get_encoder() (or the decoder) to measure_decay"
            )
        kwargs: dict[str, Any] = {"attn_implementation": "eager", "local_files_only": local_only}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = AutoModel.from_pretrained(text, **kwargs)
        try:
            tok = AutoTokenizer.from_pretrained(text, local_files_only=local_only)
        except (OSError, ValueError, TypeError, KeyError):
            tok = None  # no tokenizer saved: random-token prompts still work
        return model, tok

    if local:
        model, tok = _load(True)
    else:
        try:
            model, tok = _load(True)  # the local Hugging Face cache
        except OSError:
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            if not allow_hub or offline:
                why = "hub access is disabled" if not allow_hub else "HF_HUB_OFFLINE is set"
                raise FileNotFoundError(
                    f"model {text!r} is not a local directory nor in the Hugging Face cache, and {why}"
                ) from None
            if not _hub_reachable():
                raise FileNotFoundError(
                    f"model {text!r} is not a local directory nor in the Hugging Face cache, and the hub "
                    "(huggingface.co) does not answer; give a local directory saved with save_pretrained"
                ) from None
            model, tok = _load(False)
    dev = _resolve_device(device)
    if dev is not None:
        model = model.to(dev)
    return model.eval(), tok


# --------------------------------------------------------------------------- attention access


def _ensure_weights(model: nn.Module) -> Callable[[], None]:
    """Switch a fused-attention HF model to eager; return a function restoring the original."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is None or impl == "eager":
        return lambda: None
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={impl!r}, which cannot return attention weights, "
            "and has no set_attn_implementation(); load it with attn_implementation='eager'"
        )
    try:
        setter("eager")
    except Exception as err:  # noqa: BLE001 - any failure is a refusal with its reason
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={impl!r}, which cannot return attention weights, "
            f"and switching it to 'eager' failed: {err}"
        ) from err
    if config._attn_implementation != "eager":
        raise ValueError(
            f"{type(model).__name__} stayed on attn_implementation={config._attn_implementation!r} after asking for "
            "'eager'; it cannot return attention weights"
        )

    def restore() -> None:
        try:
            setter(impl)
        except Exception:  # noqa: BLE001 - restoring is best effort; the measurement is done
            pass

    return restore


def _attention_body(model: nn.Module) -> nn.Module:
    """The module to run for attention weights: a Hugging Face model's backbone, else the model.

    ``base_model`` of a Hugging Face model with a task head is the stack that returns the
    attentions; the head only maps its last hidden state to logits. Other modules run as given.
    """
    hf = sys.modules.get("transformers")  # a Hugging Face model means transformers is imported already
    if hf is None or not isinstance(model, hf.PreTrainedModel):
        return model
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _extract(out: Any, name: str) -> list[torch.Tensor]:
    att = out.get("attentions") if isinstance(out, Mapping) else getattr(out, "attentions", None)
    if att is None or len(att) == 0:
        raise ValueError(
            f"{name} returned no attention weights for output_attentions=True; it needs an attention "
            "implementation that materialises them (eager) or an attentions_fn"
        )
    layers = [a for a in att if a is not None]
    if not layers:
        raise ValueError(f"{name} returned only None attention weights")
    return layers


def _model_dtype(model: Any) -> Any:
    if model is None:
        return "n/a"
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None else "n/a"


def _model_context(model: Any, max_positions: int | None) -> int | None:
    if max_positions is not None:
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 2:
            raise ValueError(f"max_positions must be an integer >= 2, got {max_positions!r}")
        return max_positions
    if model is None:
        return None
    own = getattr(model, "max_positions", None)
    if isinstance(own, int):
        return own
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------- prompts


class _Prompts:
    """Token-id prompts for a seed: random ids (published) or windows of a tokenised text."""

    def __init__(self, low: int, high: int, stream: np.ndarray | None, source: str) -> None:
        self.low, self.high, self.stream, self.source = low, high, stream, source

    def draw(self, seed: int, n: int, length: int) -> np.ndarray:
        rng = random.Random(seed)
        if self.stream is None:
            # Exactly the published generator: randint per token, prompt after prompt.
            toks = [[rng.randint(self.low, self.high) for _ in range(length)] for _ in range(n)]
            return np.asarray(toks, dtype=np.int64).reshape(n, length)
        avail = self.stream.size - length + 1
        if avail < 1:
            raise ValueError(
                f"corpus {self.source} has {self.stream.size} tokens; a prompt needs {length} (distance + {PREFIX})"
            )
        starts = [rng.randrange(avail) for _ in range(n)]
        return np.stack([self.stream[s : s + length] for s in starts]).astype(np.int64)


def _make_prompts(
    corpus: str | os.PathLike, tokenizer: Any, model: Any, token_range: tuple[int, int] | None
) -> tuple[_Prompts, dict]:
    if isinstance(corpus, str) and corpus == "random":
        if token_range is not None:
            if len(token_range) != 2 or not all(isinstance(t, int) for t in token_range):
                raise ValueError(f"token_range must be (low, high) integers, got {token_range!r}")
            low, high = token_range
            vocab_from = "token_range"
        else:
            vocab = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
            vocab_from = "tokenizer.vocab_size"
            if vocab is None:
                config = getattr(model, "config", None)
                vocab = getattr(config, "vocab_size", None) or getattr(model, "vocab_size", None)
                vocab_from = "config.vocab_size"
            if vocab is None:
                raise ValueError("cannot tell the vocabulary size for random prompts; pass token_range=(low, high)")
            low, high = TOKEN_LOW, min(int(vocab) - 1, TOKEN_HIGH_CAP)
        if low < 0 or high < low:
            raise ValueError(
                f"random-token range [{low}, {high}] is empty or negative (the published range starts at {TOKEN_LOW}); "
                "pass token_range=(low, high) for a small vocabulary"
            )
        return _Prompts(low, high, None, "random"), {"corpus": "random", "token_range": [low, high], "from": vocab_from}
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path} (use corpus='random' for random tokens)")
    if tokenizer is None:
        raise ValueError(f"corpus {path} is text and needs a tokenizer; pass tokenizer= (or load the model by path)")
    text = read_text(path, "corpus")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = np.asarray(ids, dtype=np.int64).reshape(-1)
    if stream.size == 0:
        raise ValueError(f"corpus {path} tokenises to no tokens")
    return _Prompts(0, 0, stream, str(path)), {"corpus": str(path), "corpus_tokens": int(stream.size)}


# --------------------------------------------------------------------------- reductions


def _published_values(att: torch.Tensor, queries: Sequence[int], keys: Sequence[int]) -> torch.Tensor:
    """(B, H, L, L) -> (B, H, D): the weights of query ``queries[k]`` on key ``keys[k]``."""
    q = torch.as_tensor(queries, device=att.device)
    k = torch.as_tensor(keys, device=att.device)
    return att[:, :, q, k].to(torch.float64)


def _dense_values(
    att: torch.Tensor,
    distances: Sequence[int],
    query_ok: torch.Tensor,
    key_ok: torch.Tensor,
    causal: bool,
    normalize: str,
    direction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, L) -> per-head mean over kept pairs (B, H, D) and the pair counts (B, D)."""
    a = att.to(torch.float64)
    b, h, n, _ = a.shape
    if normalize == "renorm":
        mass = (a * key_ok[:, None, None, :]).sum(-1)  # (B, H, L)
        factor = torch.where(mass > 0, 1.0 / mass.clamp(min=1e-300), torch.zeros(()))
    elif normalize == "relative":
        allowed = key_ok[:, None, :].expand(b, n, n)
        if causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=a.device).tril()
        factor = allowed.sum(-1).to(a.dtype)[:, None, :].expand(b, h, n)
    else:
        factor = None
    sums = torch.zeros(b, h, len(distances), dtype=torch.float64, device=a.device)
    counts = torch.zeros(b, len(distances), dtype=torch.float64, device=a.device)
    sides = {"backward": (-1,), "forward": (1,), "both": (-1, 1)}[direction]
    for col, d in enumerate(distances):
        for side in sides:
            diag = a.diagonal(offset=side * d, dim1=-2, dim2=-1)  # (B, H, L - d)
            if side < 0:  # query i = d .. L-1, key i - d
                ok = query_ok[:, d:] & key_ok[:, : n - d]
                f = None if factor is None else factor[..., d:]
            else:  # query i = 0 .. L-1-d, key i + d
                ok = query_ok[:, : n - d] & key_ok[:, d:]
                f = None if factor is None else factor[..., : n - d]
            vals = diag if f is None else diag * f
            sums[:, :, col] += (vals * ok[:, None, :]).sum(-1)
            counts[:, col] += ok.sum(-1)
    means = sums / counts[:, None, :]  # NaN where no pair was kept
    return means, counts


# --------------------------------------------------------------------------- the measurement


def _check_distances(
    distances: Sequence[int] | None, context: int | None, protocol: str, dense: DenseOptions
) -> tuple[list[int], list[int]]:
    if distances is None:
        grid = list(PUBLISHED_DISTANCES)
        explicit = False
    else:
        if isinstance(distances, (str, bytes)) or not hasattr(distances, "__iter__"):
            raise TypeError(f"distances must be a sequence of integers, got {type(distances).__name__}")
        grid = []
        for d in distances:
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
                raise ValueError(f"distances must be integers >= 1, got {d!r}")
            grid.append(int(d))
        if not grid:
            raise ValueError("distances must not be empty")
        grid = sorted(set(grid))
        explicit = True
    limit = context
    if protocol == "dense" and dense.seq_len is not None:
        too_long = [d for d in grid if d >= dense.seq_len]
        if too_long:
            raise ValueError(
                f"distances {too_long} do not fit a dense pass of seq_len={dense.seq_len} (need d < seq_len)"
            )
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


def _is_causal(attn_fn: Callable[[torch.Tensor], list[torch.Tensor]], prompts: _Prompts, device: Any) -> bool:
    probe = torch.as_tensor(prompts.draw(0, 1, 16), device=device)
    layers = attn_fn(probe)
    upper = max(float(torch.triu(a.float(), diagonal=1).abs().max()) for a in layers)
    return upper <= 1e-6


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
    progress: bool = False,
) -> DecayMeasurement:
    """Measure ``A(d)`` per layer, per head and in aggregate (see the module docstring).

    ``distances=None`` takes the published grid, dropping the distances whose sequence
    (``d + 50`` tokens) does not fit the model's context; explicit distances beyond it are an
    error. ``passes``: "auto" (one pass per prompt for causal models, per distance otherwise),
    "one" or "per_distance" (published protocol only). ``causal=None`` detects causality from
    the weights of a short probe pass (all weights above the diagonal zero). ``batch_size``
    prompts go through the model together; peak memory is about
    ``batch_size * layers * heads * L^2`` attention weights. ``device``/``dtype`` move (and
    cast) the model. ``progress`` shows a tqdm bar on stderr.
    """
    if protocol not in ("published", "dense"):
        raise ValueError(f"protocol must be 'published' or 'dense', got {protocol!r}")
    if passes not in ("auto", "one", "per_distance"):
        raise ValueError(f"passes must be 'auto', 'one' or 'per_distance', got {passes!r}")
    if prompt_stream not in ("nested", "published"):
        raise ValueError(f"prompt_stream must be 'nested' or 'published', got {prompt_stream!r}")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive integer, got {n_prompts!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}")
    dense = dense or DenseOptions()
    if not isinstance(dense, DenseOptions):
        raise TypeError(f"dense must be a DenseOptions, got {type(dense).__name__}")

    t_start = time.perf_counter()
    torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    restore: Callable[[], None] = lambda: None  # noqa: E731
    if model is None and attentions_fn is None:
        raise TypeError("give a model (nn.Module, directory or hub id) or attentions_fn")
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        model, loaded_tok = load_hf_model(model, device=dev, dtype=torch_dtype, allow_hub=allow_hub)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    elif model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, a directory or a hub id, got {type(model).__name__}")
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", "") or type(model).__name__
        if dev is not None or torch_dtype is not None:
            model = model.to(device=dev, dtype=torch_dtype)
        model.eval()
    else:
        name = getattr(attentions_fn, "__name__", "attentions_fn")

    if model is not None:
        param = next(iter(model.parameters()), None)
        run_device = param.device if param is not None else (dev or torch.device("cpu"))
    else:
        run_device = dev or torch.device("cpu")

    if attentions_fn is not None:
        fn = attentions_fn
        forward_module = "attentions_fn"

        def attn_fn(ids: torch.Tensor) -> list[torch.Tensor]:
            layers = [a for a in fn(ids) if a is not None]
            if not layers:
                raise ValueError("attentions_fn returned no attention weights")
            return layers
    else:
        restore = _ensure_weights(model)  # type: ignore[arg-type]
        body = _attention_body(model)  # type: ignore[arg-type]
        forward_module = type(body).__name__
        kwargs: dict[str, Any] = {"output_attentions": True}
        if getattr(getattr(body, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False  # a KV cache is useless here and costs memory

        def attn_fn(ids: torch.Tensor) -> list[torch.Tensor]:
            return _extract(body(input_ids=ids, **kwargs), name)

    try:
        context = _model_context(model, max_positions)
        grid, dropped = _check_distances(distances, context, protocol, dense)
        prompts, corpus_info = _make_prompts(corpus, tokenizer, model, token_range)
        with torch.inference_mode():
            is_causal = _is_causal(attn_fn, prompts, run_device) if causal is None else bool(causal)
            result = _run(
                attn_fn,
                name,
                protocol,
                grid,
                n_prompts,
                seeds,
                prompts,
                passes,
                prompt_stream,
                is_causal,
                dense,
                batch_size,
                run_device,
                tokenizer,
                progress,
            )
    finally:
        restore()
    result.wall_time_s = time.perf_counter() - t_start
    result.info.update(corpus_info)
    result.info.update(
        {
            "context": context,
            "dropped_distances": dropped,
            "device": str(run_device),
            "dtype": str(torch_dtype or _model_dtype(model)),
            "causal_detected": causal is None,
            "prefix": PREFIX,
            "forward_module": forward_module,
        }
    )
    return result


def _run(
    attn_fn: Callable[[torch.Tensor], list[torch.Tensor]],
    name: str,
    protocol: str,
    grid: list[int],
    n_prompts: int,
    seeds: tuple[int, ...],
    prompts: _Prompts,
    passes: str,
    prompt_stream: str,
    causal: bool,
    dense: DenseOptions,
    batch_size: int,
    device: Any,
    tokenizer: Any,
    progress: bool,
) -> DecayMeasurement:
    from tqdm.auto import tqdm

    n_d = len(grid)
    if protocol == "published":
        if passes == "auto":
            passes = "one" if causal else "per_distance"
        if passes == "one" and not causal:
            raise ValueError("passes='one' is exact only for causal models; this model is bidirectional")
        if prompt_stream == "published" and passes == "one":
            raise ValueError("prompt_stream='published' restarts the generator per distance; use passes='per_distance'")
        mode = passes
    else:
        if prompt_stream == "published":
            raise ValueError("prompt_stream='published' applies to the published protocol only")
        mode = "dense"
        direction = dense.direction if dense.direction != "auto" else ("backward" if causal else "both")
        if causal and direction != "backward":
            raise ValueError(f"direction={dense.direction!r} reads keys after the query; this model is causal")

    special = set()
    if protocol == "dense" and dense.exclude_special and tokenizer is not None:
        special = {int(t) for t in getattr(tokenizer, "all_special_ids", []) or []}

    batches_per_seed = math.ceil(n_prompts / batch_size)
    total = len(seeds) * batches_per_seed * (n_d if mode == "per_distance" else 1)
    # disable=None: a bar only when stderr is a terminal, so piped logs carry no redraws
    bar = tqdm(total=total, disable=None if progress else True, desc=f"lens {protocol} ({mode})", unit="pass",
               leave=False)  # fmt: skip

    prompt_layer: np.ndarray | None = None
    lh_sum = lh_sq = lh_n = None
    pair_counts = np.zeros(n_d)
    n_passes = n_tokens = 0

    def store(s: int, p0: int, vals: np.ndarray, cols: Any) -> None:
        # vals (B, Ly, H, len(cols)) -> per-prompt layer means and running per-head sums
        nonlocal prompt_layer, lh_sum, lh_sq, lh_n
        b, ly, h = vals.shape[:3]
        if prompt_layer is None:
            prompt_layer = np.full((len(seeds), n_prompts, ly, n_d), np.nan)
            lh_sum, lh_sq, lh_n = (np.zeros((ly, h, n_d)) for _ in range(3))
        if prompt_layer.shape[2] != ly or lh_sum.shape[1] != h:
            raise ValueError(f"{name} changed its number of layers/heads between passes: {ly}x{h}")
        with _quiet_nanmean():
            prompt_layer[s, p0 : p0 + b, :, cols] = np.nanmean(vals, axis=2)
        ok = np.isfinite(vals)
        v0 = np.where(ok, vals, 0.0)
        lh_sum[:, :, cols] += v0.sum(0)
        lh_sq[:, :, cols] += (v0**2).sum(0)
        lh_n[:, :, cols] += ok.sum(0)

    def forward(ids: np.ndarray) -> list[torch.Tensor]:
        nonlocal n_passes, n_tokens
        x = torch.as_tensor(ids, device=device)
        layers = attn_fn(x)
        b, n = ids.shape
        for i, a in enumerate(layers):
            if a.ndim != 4 or a.shape[0] != b or a.shape[-1] != n or a.shape[-2] != n:
                raise ValueError(
                    f"{name}: attention of layer {i} has shape {tuple(a.shape)}, expected (B={b}, H, L={n}, L={n})"
                )
        n_passes += 1
        n_tokens += b * n
        bar.update(1)
        return layers

    try:
        for s, seed in enumerate(seeds):
            if mode == "one" or mode == "dense":
                length = (dense.seq_len or max(grid) + PREFIX) if mode == "dense" else max(grid) + PREFIX
                all_ids = prompts.draw(int(seed), n_prompts, length)
                for p0 in range(0, n_prompts, batch_size):
                    ids = all_ids[p0 : p0 + batch_size]
                    layers = forward(ids)
                    if mode == "one":
                        # query d + PREFIX - 1, key PREFIX - 1: the last query of the length-(d + PREFIX) prefix
                        qs = [d + PREFIX - 1 for d in grid]
                        ks = [PREFIX - 1] * n_d
                        vals = torch.stack([_published_values(a, qs, ks) for a in layers], 1)
                        pair_counts += ids.shape[0]
                    else:
                        ids_t = torch.as_tensor(ids, device=layers[0].device)
                        ok = torch.ones_like(ids_t, dtype=torch.bool)
                        if special:
                            ok &= ~torch.isin(ids_t, torch.as_tensor(sorted(special), device=ids_t.device))
                        key_ok = ok.clone()
                        key_ok[:, : dense.exclude_sink] = False
                        outs = [_dense_values(a, grid, ok, key_ok, causal, dense.normalize, direction) for a in layers]
                        vals = torch.stack([m for m, _ in outs], 1)
                        pair_counts += outs[0][1].sum(0).cpu().numpy()
                    store(s, p0, vals.cpu().numpy(), slice(None))
                    del layers
            else:  # one pass per distance
                nested = prompts.draw(int(seed), n_prompts, max(grid) + PREFIX) if prompt_stream == "nested" else None
                for col, d in enumerate(grid):
                    length = d + PREFIX
                    ids_d = nested[:, :length] if nested is not None else prompts.draw(int(seed), n_prompts, length)
                    for p0 in range(0, n_prompts, batch_size):
                        ids = ids_d[p0 : p0 + batch_size]
                        layers = forward(np.ascontiguousarray(ids))
                        vals = torch.stack([_published_values(a, [length - 1], [length - 1 - d]) for a in layers], 1)
                        pair_counts[col] += ids.shape[0]
                        store(s, p0, vals.cpu().numpy(), slice(col, col + 1))
                        del layers
    finally:
        bar.close()

    assert prompt_layer is not None and lh_sum is not None and lh_sq is not None and lh_n is not None
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lh_sum / lh_n
        var = np.maximum(lh_sq / lh_n - mean**2, 0.0) * lh_n / np.maximum(lh_n - 1, 1)
    sample_counts = np.isfinite(prompt_layer).any(axis=2).sum(axis=(0, 1)).astype(np.int64)
    info: dict[str, Any] = {"prompt_stream": prompt_stream if protocol == "published" else "nested"}
    if protocol == "dense":
        info["dense"] = {**asdict(dense), "direction_used": direction, "n_special_ids": len(special)}
    return DecayMeasurement(
        model_name=name,
        protocol=protocol,
        passes=mode,
        causal=causal,
        distances=np.asarray(grid, dtype=np.int64),
        seeds=tuple(int(s) for s in seeds),
        n_prompts=n_prompts,
        prompt_layer=prompt_layer,
        layer_head=mean,
        layer_head_sd=np.sqrt(var),
        sample_counts=sample_counts,
        pair_counts=pair_counts,
        paired=mode in ("one", "dense") or prompt_stream == "nested",
        n_passes=n_passes,
        n_tokens=n_tokens,
        wall_time_s=0.0,
        info=info,
    )
