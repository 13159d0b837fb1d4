"""Models for the lens: loading from a directory or the hub, and reaching their attention.

Offline first: a directory is loaded with ``local_files_only``; a hub id is looked up in the
local Hugging Face cache first and downloaded only when the hub's own offline switch
(``HF_HUB_OFFLINE``) is off and the caller allows it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from levyattn.io import is_hub_id

__all__ = ["load_hf_model"]

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device | None:
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


def _hub_offline() -> bool:
    """The hub's offline switch: ``HF_HUB_OFFLINE`` as huggingface_hub read it, or as set since."""
    from huggingface_hub import is_offline_mode

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return is_offline_mode() or env


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading bar and no LOAD REPORT while loading: the lens reads the loading info itself.

    Loading a backbone from a checkpoint with a task head reports the head's weights
    (``lm_head.weight``...) as unexpected; that is expected, and :func:`load_hf_model` keeps the
    keys that matter (missing ones) in the model's ``lens_load_info``.
    """
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def load_hf_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_hub: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a Hugging Face backbone (its default attention, SDPA for most) and its tokenizer (None if it has none).

    A model saved with ``fna_*`` config keys (an FNA model, e.g. after ``to_fna``) is loaded with
    ``attn_implementation="fna"``, which transformers does not save.

    An existing directory (or a ``.gguf`` file, de-quantized to float32 by transformers, which
    needs the ``gguf`` package) is loaded with ``local_files_only``; any other string must be a hub
    id, looked up in the local cache first and downloaded only when ``allow_hub`` and the hub is
    not offline (``HF_HUB_OFFLINE``); otherwise FileNotFoundError says why. Encoder-decoder
    models are refused (pass their encoder module instead). A tokenizer saved without a
    vocabulary (``vocab_size`` 0) counts as none. The model's ``lens_load_info`` holds the
    checkpoint keys the backbone did not find (``missing_keys``) and the ones it left unused
    (``unexpected_keys``: a task head's weights).
    """
    from levyattn._extras import require

    require("hf", "transformers", purpose="loading a Hugging Face model")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    text = os.fspath(source)
    path = Path(text)
    torch_dtype = resolve_dtype(dtype)
    file_kwargs: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".gguf":  # llama.cpp weights, de-quantized by transformers
        text, file_kwargs = str(path.parent), {"gguf_file": path.name}
        local = True
    elif path.is_dir():
        local = True
    elif path.exists():
        raise ValueError(f"model {text!r} is a file; give a model directory, a .gguf file or a hub id")
    elif not is_hub_id(text):
        raise FileNotFoundError(f"model {text!r}: no such directory, and not a valid Hugging Face hub id")
    else:
        local = False

    def _load(local_only: bool) -> tuple[Any, Any]:
        config = AutoConfig.from_pretrained(text, local_files_only=local_only, **file_kwargs)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"model {text!r} is an encoder-decoder ({type(config).__name__}); the lens measures one stack: "
                "load it yourself and pass model.get_encoder() (or the decoder) to measure_decay"
            )
        # the model's default attention (sdpa where it has it); the lens switches it for the measurement
        kwargs: dict[str, Any] = {"local_files_only": local_only, **file_kwargs}
        from levyattn.integrations.hf_attention import ATTN_IMPLEMENTATION
        from levyattn.integrations.hf_settings import CONFIG_KEYS

        if any(hasattr(config, key) for key in CONFIG_KEYS):
            # saved as an FNA model: transformers does not save attn_implementation, and its
            # default would run softmax attention on the FNA model's weights
            kwargs["attn_implementation"] = ATTN_IMPLEMENTATION
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        with _quiet_transformers():
            model, loading = AutoModel.from_pretrained(text, output_loading_info=True, **kwargs)
            try:
                tok = AutoTokenizer.from_pretrained(text, local_files_only=local_only, **file_kwargs)
            except (OSError, ValueError, TypeError, KeyError):
                tok = None  # no tokenizer saved: random-token prompts still work
        if tok is not None and not getattr(tok, "vocab_size", 0):
            tok = None  # transformers builds an empty tokenizer when none was saved
        model.lens_load_info = {k: sorted(loading.get(k, [])) for k in ("missing_keys", "unexpected_keys")}
        return model, tok

    if local:
        model, tok = _load(True)
    else:
        try:
            model, tok = _load(True)  # the local Hugging Face cache
        except OSError:
            if not allow_hub or _hub_offline():
                why = "hub access is disabled" if not allow_hub else "HF_HUB_OFFLINE is set"
                raise FileNotFoundError(
                    f"model {text!r} is not a local directory nor in the Hugging Face cache, and {why}"
                ) from None
            try:
                model, tok = _load(False)
            except OSError as err:
                raise FileNotFoundError(
                    f"model {text!r} is not a local directory nor in the Hugging Face cache, and the hub did not "
                    f"provide it ({err}); give a local directory saved with save_pretrained"
                ) from None
    dev = resolve_device(device)
    if dev is not None:
        model = model.to(dev)
    return model.eval(), tok


def saved_vocabulary(source: str | os.PathLike) -> int | None:
    """``vocab_size`` of the config saved with a model directory, or cached for a hub id, read
    without loading weights; None when it cannot be read so (no such config on this machine, a
    ``.gguf`` file, a config without a top-level ``vocab_size``): the check then waits for the model.
    """
    from levyattn._extras import require

    require("hf", "transformers", purpose="loading a Hugging Face model")
    from transformers import AutoConfig

    text = os.fspath(source)
    if not (Path(text).is_dir() or (not Path(text).exists() and is_hub_id(text))):
        return None
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(text, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None
    vocab = getattr(config, "vocab_size", None)
    return int(vocab) if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None


def uses_fna(model: nn.Module) -> bool:
    """Whether a Hugging Face model's attention implementation is levyattn's FNA, under any registered name."""
    hf = sys.modules.get("transformers")
    if hf is None or not isinstance(model, hf.PreTrainedModel):
        return False
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from levyattn.integrations.hf_attention import fna_attention_forward

    impl = getattr(model.config, "_attn_implementation", None)
    return isinstance(impl, str) and ALL_ATTENTION_FUNCTIONS.get(impl) is fna_attention_forward


def fna_density(model: nn.Module) -> bool:
    """Whether an FNA model normalises by key density (``fna_density_a`` > 0 in some layer).

    Its column sums span every query, later ones included, so its weights on a prefix are not
    those of the prefix alone, even when they are causal.
    """
    if not uses_fna(model):
        return False
    from levyattn.integrations.hf_settings import validate_fna_config

    density = validate_fna_config(model.config)["fna_density_a"]
    return any(v != 0 for v in (density if isinstance(density, list) else [density]))


def ensure_eager(model: nn.Module) -> Callable[[], None]:
    """Switch a fused-attention HF model to eager; return a function restoring the original.

    An FNA model stays on FNA: it returns its own weights (from the reference kernel) when asked,
    and eager would be softmax attention, another model.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is None or impl == "eager" or uses_fna(model):
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
    return _restorer(setter, impl)


def switch_to_rows(model: nn.Module) -> tuple[Callable[[], None] | None, str]:
    """Put a Hugging Face model on the row-capturing attention; (restore, "") or (None, why not).

    A softmax model goes to ``levyattn_lens_rows``, an FNA model to ``levyattn_lens_fna_rows``
    (its own FNA, rows from the reference kernel).
    """
    hf = sys.modules.get("transformers")
    if hf is None or not isinstance(model, hf.PreTrainedModel):
        return None, f"{type(model).__name__} is not a Hugging Face PreTrainedModel"
    from levyattn.lens.capture import FNA_ROWS_IMPLEMENTATION, ROWS_IMPLEMENTATION

    impl = model.config._attn_implementation
    try:
        model.set_attn_implementation(FNA_ROWS_IMPLEMENTATION if uses_fna(model) else ROWS_IMPLEMENTATION)
    except Exception as err:  # noqa: BLE001 - any failure means: keep the eager path, and say why
        return None, f"{type(model).__name__} does not accept a registered attention function ({err})"
    return _restorer(model.set_attn_implementation, impl), ""


def _restorer(setter: Callable[[str], Any], impl: str) -> Callable[[], None]:
    def restore() -> None:
        try:
            setter(impl)
        except Exception:  # noqa: BLE001 - restoring is best effort; the measurement is done
            pass

    return restore


def attention_body(model: nn.Module) -> nn.Module:
    """The module to run for attention weights: a Hugging Face model's backbone, else the model.

    ``base_model`` of a Hugging Face model with a task head is the stack that returns the
    attentions; the head only maps its last hidden state to logits. Other modules run as given.
    """
    hf = sys.modules.get("transformers")  # a Hugging Face model means transformers is imported already
    if hf is None or not isinstance(model, hf.PreTrainedModel):
        return model
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def extract_attentions(out: Any, name: str) -> list[torch.Tensor]:
    """The per-layer (B, H, L, L) weights of a model output (object or mapping with ``attentions``)."""
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


def model_dtype(model: Any) -> Any:
    if model is None:
        return "n/a"
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None else "n/a"


def model_context(model: Any, max_positions: int | None) -> int | None:
    """Positions the model can take: ``max_positions``, else the model's or its config's own."""
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
