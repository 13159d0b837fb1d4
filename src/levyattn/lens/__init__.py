"""The fractional lens: measure any transformer's attention decay A(d) ~ d^-gamma and read gamma
as a fractional order (docs/lens.md).

    from levyattn.lens import measure_decay, analyze_decay, fractional_order
    m = measure_decay(model_or_dir, protocol="published", n_prompts=20)
    result = analyze_decay(m)          # fits, bootstrap CI, per-layer/head gamma, reading
    result.reading.regime              # "smoothing" | "crossover" | "differentiating"

The mappings alpha = gamma - 1 and s = (gamma - 1)/2 are interpretations, and position-space
decay is not FNA's feature-space kernel (``CAVEAT``).
"""

from levyattn.lens.atlas import (
    ATLAS_SCHEMA,
    PUBLISHED_SOURCE,
    AtlasEntry,
    append_to_atlas,
    default_user_atlas_path,
    load_published_atlas,
    load_user_atlas,
    select_entries,
)
from levyattn.lens.fit import (
    D_MIN_FIT,
    ExponentialFit,
    GammaBootstrap,
    ModelChoice,
    PowerLawFit,
    bootstrap_gamma,
    choose_model,
    fit_exponential,
    fit_power_law,
)
from levyattn.lens.fractional import CAVEAT, CROSSOVER_TOL, FractionalReading, fractional_order
from levyattn.lens.measure import (
    PUBLISHED_DISTANCES,
    PUBLISHED_N_PROMPTS,
    PUBLISHED_SEEDS,
    DecayMeasurement,
    DenseOptions,
    load_hf_model,
    measure_decay,
)
from levyattn.lens.options import check_lens_options
from levyattn.lens.report import LensResult, analyze_decay, write_lens_outputs

__all__ = [
    "ATLAS_SCHEMA",
    "CAVEAT",
    "CROSSOVER_TOL",
    "D_MIN_FIT",
    "PUBLISHED_DISTANCES",
    "PUBLISHED_N_PROMPTS",
    "PUBLISHED_SEEDS",
    "PUBLISHED_SOURCE",
    "AtlasEntry",
    "DecayMeasurement",
    "DenseOptions",
    "ExponentialFit",
    "FractionalReading",
    "GammaBootstrap",
    "LensResult",
    "ModelChoice",
    "PowerLawFit",
    "analyze_decay",
    "append_to_atlas",
    "bootstrap_gamma",
    "check_lens_options",
    "choose_model",
    "default_user_atlas_path",
    "fit_exponential",
    "fit_power_law",
    "fractional_order",
    "load_hf_model",
    "load_published_atlas",
    "load_user_atlas",
    "measure_decay",
    "select_entries",
    "write_lens_outputs",
]
