"""Perceptual similarity backends: images in, embeddings out (DESIGN §7)."""

from .base import Backend, build_backend, backend_names, DEFAULT_ALPHA
from .index import EmbeddingIndex

__all__ = ["Backend", "build_backend", "backend_names", "DEFAULT_ALPHA", "EmbeddingIndex"]
