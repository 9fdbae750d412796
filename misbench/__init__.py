"""misbench: the Mechanistic Interpretability Score for pruned vision networks.

The public API (docs/api.md) is misbench.api's functions, re-exported here. Some share their name
with the library module that implements them (misbench.extract, .audit, .evaluate, .study): as
attributes of the package they are the functions; import from those modules with
`from misbench.extract import ExtractSettings`.
"""

__version__ = "0.1.0"

from .api import (LayerInfo, audit, evaluate, extract, layers, load_model, load_scores, open_activations,  # noqa: E402
                  prune, report, retrain, score, study)

__all__ = ["__version__", "LayerInfo", "audit", "evaluate", "extract", "layers", "load_model", "load_scores",
           "open_activations", "prune", "report", "retrain", "score", "study"]
