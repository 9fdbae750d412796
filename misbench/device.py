"""Device choice and the per-device fast paths, in one place.

Every path below runs on CPU too (the tests run them there): channels-last is faster for
convolutions on CPUs as well, and autocast uses bfloat16 on CPU where CUDA uses float16.
"""

__all__ = ["resolve_device", "prepare_model", "to_device", "autocast", "AMP_DTYPES"]

import os

import torch
from torch import nn

from .errors import MisbenchError

AMP_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`, `cpu` or `cuda[:N]`; under torchrun every CUDA rank uses its own GPU (LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MisbenchError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise MisbenchError(f"unknown device {device!r}: expected auto, cpu or cuda[:N]")
    if device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to `device` in channels-last layout (about 2x faster convolutions on CPU and tensor cores)."""
    return model.to(device, memory_format=torch.channels_last)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`, channels-last when it is an image batch."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def autocast(device: torch.device, enabled: bool):
    """Mixed precision for `device`: float16 on CUDA, bfloat16 on CPU; a no-op when not enabled."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[device.type], enabled=enabled)
