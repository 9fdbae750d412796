"""Device choice in one place."""

__all__ = ["resolve_device"]

import torch

from .errors import MisbenchError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MisbenchError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise MisbenchError(f"unknown device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)
