"""ntksap_fast: fast, exact, reproducible NTK-SAP pruning at initialization.

from ntksap_fast import ntk_sap_prune, apply_masks
masks = ntk_sap_prune(model, density=0.05, input_shape=(3, 32, 32))
apply_masks(model, masks)
"""

from .engine.arena import register_layer
from .io.export import export_pruned
from .io.masks import apply_masks, load_masks, mask_density, save_masks
from .io.semi_structured import to_semi_structured
from .methods.baselines import prune
from .options import ScorerOptions
from .presets import PRESETS, Preset
from .scorer import NtkSapScorer, ntk_sap_prune, ntk_sap_scores
from .select.schedule import density_schedule, keep_count

__all__ = [
    "NtkSapScorer",
    "ntk_sap_prune",
    "ntk_sap_scores",
    "prune",
    "apply_masks",
    "save_masks",
    "load_masks",
    "mask_density",
    "density_schedule",
    "keep_count",
    "PRESETS",
    "Preset",
    "ScorerOptions",
    "register_layer",
    "export_pruned",
    "to_semi_structured",
]


def _version() -> str:
    """The installed distribution's version (written once, in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ntksap_fast")
    except PackageNotFoundError:  # a source tree used without installing it
        return "0+unknown"


__version__ = _version()
