"""The process around the work: devices, torch.distributed, signals, locks, atomic files, paths."""

__all__: list[str] = []  # its modules are imported by name
