"""Activations out: hooks, extraction, the HDF5 store, top-k, dictionary features, accuracy."""

__all__: list[str] = []  # its modules are imported by name
