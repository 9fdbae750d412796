"""MIS: the pure maths, the score run and its files, interval statistics, alpha calibration."""

__all__: list[str] = []  # its modules are imported by name
