"""Attention as a random walk: spectral gap, mixing, path lengths, diffusion maps.

Everything takes plain tensors or arrays -- attention matrices (..., N, N) with rows summing
to 1, or point clouds (N, d) -- so it serves levyattn models, softmax models and Hugging Face
models alike (``output_attentions=True`` gives one (B, H, N, N) tensor per layer).

Mask convention throughout: ``mask`` is boolean (..., N) with True = valid token; the matrix
is restricted to valid tokens and its rows renormalised (see ``_checks``).
"""

from levyattn.analysis._checks import ROW_SUM_ATOL, ROW_SUM_ATOL_LOW
from levyattn.analysis.diffusion_maps import DiffusionMap
from levyattn.analysis.mixing import mixing_time, stationary
from levyattn.analysis.paths import PathLengths, path_lengths
from levyattn.analysis.spectral import DENSE_MAX_N, spectral_gap
from levyattn.analysis.summary import attention_summary, row_entropy

__all__ = [
    "DENSE_MAX_N",
    "ROW_SUM_ATOL",
    "ROW_SUM_ATOL_LOW",
    "DiffusionMap",
    "PathLengths",
    "attention_summary",
    "mixing_time",
    "path_lengths",
    "row_entropy",
    "spectral_gap",
    "stationary",
]
