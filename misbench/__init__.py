"""misbench: the Mechanistic Interpretability Score for pruned vision networks.

The public API (docs/api.md) is misbench.api's functions, re-exported here. The library's modules
live in subpackages named after the pipeline's stages (docs/contributing.md); none is named like an
API function, so `misbench.extract` is always the function.

The names are resolved on first use (PEP 562): misbench.api loads torch (seconds), which `import misbench` alone,
the `misbench --help` of the CLI and a `from misbench.errors import ...` never need; scipy and pandas load with the
first score or table.
"""

from .version import __version__

__all__ = ["__version__", "LayerInfo", "audit", "evaluate", "extract", "import_scores", "layers", "list_assets",
           "load_model", "load_scores", "merge_scores", "open_activations", "plot_unit", "prune", "report", "retrain",
           "score", "stage_assets", "study", "train_dictionary", "unit_images"]


def __getattr__(name: str):
    if name in __all__:
        # the API and what it imports (torch): loaded when one of its names is first used
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'misbench' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
