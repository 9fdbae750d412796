"""Images in: DATA strings, class-folder labels, and images read back for similarity backends."""

__all__: list[str] = []  # its modules are imported by name
