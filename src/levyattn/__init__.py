"""levyattn: fractional (Lévy) attention for PyTorch."""

from levyattn.config import FNAConfig
from levyattn.functional import fractional_attention
from levyattn.nn import (
    FractionalMultiheadAttention,
    FractionalTransformerDecoderLayer,
    FractionalTransformerEncoderLayer,
    KVCache,
    SoftmaxMultiheadAttention,
    make_attention,
)

__version__ = "0.1.0"

__all__ = [
    "FNAConfig",
    "FractionalMultiheadAttention",
    "FractionalTransformerDecoderLayer",
    "FractionalTransformerEncoderLayer",
    "KVCache",
    "SoftmaxMultiheadAttention",
    "__version__",
    "fractional_attention",
    "make_attention",
]
