"""A whole study from one config: the config, the run, the manifest."""

__all__: list[str] = []  # its modules are imported by name
