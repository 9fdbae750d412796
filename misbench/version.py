"""The package version, importable by every module without importing the package."""

__all__ = ["__version__"]

__version__ = "0.1.0"
