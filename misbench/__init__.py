"""misbench: the Mechanistic Interpretability Score for pruned vision networks.

The public API (docs/api.md) is misbench.api's functions, re-exported here. The library's modules
live in subpackages named after the pipeline's stages (docs/contributing.md); none is named like an
API function, so `misbench.extract` is always the function.
"""

from .api import (LayerInfo, audit, evaluate, extract, layers, load_model, load_scores, open_activations, plot_unit,
                  prune, report, retrain, score, study, unit_images)
from .version import __version__

__all__ = ["__version__", "LayerInfo", "audit", "evaluate", "extract", "layers", "load_model", "load_scores",
           "open_activations", "plot_unit", "prune", "report", "retrain", "score", "study", "unit_images"]
