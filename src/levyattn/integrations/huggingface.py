"""FNA inside Hugging Face ``transformers`` models: ``attn_implementation="fna"`` and ``to_fna``.

The public import path; the code lives in four modules, one job each:

- :mod:`levyattn.integrations.hf_attention`: the registered attention function, the writing of the
  ``fna_*`` config keys and the reading of one layer's values, and :func:`register`;
- :mod:`levyattn.integrations.hf_settings`: the ``fna_*`` keys (defaults, validation, per-layer and
  per-head values) and the attention modules that read them;
- :mod:`levyattn.integrations.hf_stacks`: the values of a T5-style model's stacks, kept through
  ``save_pretrained``;
- :mod:`levyattn.integrations.hf_convert`: :func:`to_fna`, which converts a pretrained softmax
  model and calibrates its bandwidth, and its :class:`ConversionReport`.

Importing this module (or ``hf_attention``) registers ``"fna"`` in transformers' attention and
mask registries; :func:`register` does it explicitly and returns the name::

    import levyattn.integrations.huggingface as fna_hf  # registers "fna"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=fna_hf.register())
    model = AutoModel.from_pretrained(path, attn_implementation="fna")
    model.set_attn_implementation("fna")

See :mod:`levyattn.integrations.hf_attention` for the config keys and what the registered
function does with masks, scaling, grouped-query heads, attention weights and dropout.
"""

from __future__ import annotations

from levyattn.integrations.hf_attention import (
    ATTN_IMPLEMENTATION,
    CONFIG_KEYS,
    assign_layer_indices,
    configure_fna,
    fna_attention_forward,
    layer_settings,
    register,
    validate_fna_config,
)
from levyattn.integrations.hf_convert import ConversionReport, to_fna

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CONFIG_KEYS",
    "ConversionReport",
    "assign_layer_indices",
    "configure_fna",
    "fna_attention_forward",
    "layer_settings",
    "register",
    "to_fna",
    "validate_fna_config",
]
