"""misbench: the Mechanistic Interpretability Score for pruned vision networks.

The public API (docs/api.md) is misbench.api's functions, re-exported here. Some share their name
with the library module that implements them (misbench.extract, .audit, .evaluate, .study): as
attributes of the package they are the functions; import from those modules with
`from misbench.activations.extract import ExtractSettings`.
"""

from .api import (LayerInfo, audit, evaluate, extract, layers, load_model, load_scores, open_activations, prune, report,
                  retrain, score, study)
from .version import __version__

__all__ = ["__version__", "LayerInfo", "audit", "evaluate", "extract", "layers", "load_model", "load_scores",
           "open_activations", "prune", "report", "retrain", "score", "study"]
