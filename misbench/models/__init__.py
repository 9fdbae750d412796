"""Models in: architectures, MODEL strings, the checkpoint format, preprocessing, staged weights."""

__all__: list[str] = []  # its modules are imported by name
