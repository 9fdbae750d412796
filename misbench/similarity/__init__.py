"""Perceptual similarity backends: images in, embeddings out (DESIGN §7)."""

from .base import DEFAULT_ALPHA, Backend, backend_names, build_backend
from .index import EmbeddingIndex

__all__ = ["Backend", "build_backend", "backend_names", "DEFAULT_ALPHA", "EmbeddingIndex"]
