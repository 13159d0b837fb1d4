"""levyattn: fractional (Lévy) attention for PyTorch."""

from levyattn.config import FNAConfig
from levyattn.functional import fractional_attention

__version__ = "0.1.0"

__all__ = ["FNAConfig", "fractional_attention", "__version__"]
