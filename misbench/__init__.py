"""misbench: the Mechanistic Interpretability Score for pruned vision networks."""

__version__ = "0.1.0"

__all__ = ["__version__"]
