"""Integrations of FNA with other libraries.

- :mod:`levyattn.integrations.huggingface`: FNA as an attention implementation of
  Hugging Face ``transformers`` models (``attn_implementation="fna"``) and
  :func:`~levyattn.integrations.huggingface.to_fna` to convert a pretrained softmax model.
  It re-exports :mod:`~levyattn.integrations.hf_attention` (the registered function,
  ``configure_fna``, ``register``), :mod:`~levyattn.integrations.hf_settings` (the ``fna_*`` config
  keys and their validation) and :mod:`~levyattn.integrations.hf_convert`
  (``to_fna`` and its report).

Submodules are imported explicitly (``import levyattn.integrations.huggingface``) so that
``import levyattn`` never pulls in ``transformers``.
"""
