"""Perceptual similarity backends: images in, embeddings out (DESIGN §7)."""

from . import deepfeat, dreamsim, lpips, pixel  # noqa: F401  (each backend registers itself on import)
from .base import BACKENDS, Backend, backend_from_settings, backend_names, build_backend
from .index import EmbeddingIndex

__all__ = ["BACKENDS", "Backend", "build_backend", "backend_from_settings", "backend_names", "EmbeddingIndex"]
