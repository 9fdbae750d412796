"""Device choice and the per-device fast paths, in one place.

Every path below runs on CPU too (the tests run them there): channels-last is faster for
convolutions on CPUs as well, and autocast uses bfloat16 on CPU where CUDA uses float16.
"""

__all__ = ["resolve_device", "prepare_model", "to_device", "precision", "loader_workers", "parse_workers", "make_loader",
           "workers_setting", "device_setting", "batch_size_setting", "describe", "available_memory", "AMP_DTYPES",
           "MAX_AUTO_WORKERS"]

import contextlib
import os

import torch
from torch import nn

from ..errors import MisbenchError
from .schema import setting

AMP_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}
MAX_AUTO_WORKERS = 16  # ImageNet JPEG decoding needs about this many to feed one current GPU


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


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for new work on `device`, how that was measured): the GPU's free memory, else the
    system's MemAvailable (Linux), else its free pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    try:
        with open("/proc/meminfo") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return int(info["MemAvailable"].split()[0]) * 1024, "available (MemAvailable)"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available"


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to `device` in channels-last layout (about 2x faster convolutions on CPU and tensor cores)."""
    return model.to(device, memory_format=torch.channels_last)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`, channels-last when it is an image batch."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def precision(device: torch.device, amp: bool):
    """With `amp`, autocast to float16 on CUDA or bfloat16 on CPU; without, exact float32 (no
    TF32, which PyTorch otherwise lets cuDNN use for convolutions: a 10-bit mantissa)."""
    if amp:
        return torch.autocast(device.type, dtype=AMP_DTYPES[device.type])
    return _exact_float32()


@contextlib.contextmanager
def _exact_float32():
    flags = (torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")
    saved = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)


def loader_workers(workers: int | None, device: torch.device) -> int:
    """DataLoader worker processes; None means auto: on CUDA, the cores of this rank's share of the
    node less one for the main process (at most MAX_AUTO_WORKERS), so decoding keeps the GPU fed;
    on CPU none, since the model's threads already use every core."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


def parse_workers(value) -> int | None:
    """`auto` (None) or a number of worker processes >= 0, from a command line or a config."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise MisbenchError(f"workers {value!r}: expected auto or a number of loader processes >= 0")


def workers_setting():
    """The `workers` field of every settings dataclass that loads images (None: auto)."""
    return setting(None, cli_default="auto", parse=parse_workers, metavar="auto|N", config=False,
                   help=f"DataLoader worker processes; auto: on CUDA this rank's share of the cores less one (at most "
                        f"{MAX_AUTO_WORKERS}), on CPU 0.")


def device_setting():
    """The `device` field of every settings dataclass that runs a network."""
    return setting("auto", help="auto, cpu or cuda[:N].", config=False)


def batch_size_setting(default: int = 64):
    return setting(default, low=1, help="Images per batch.")


def make_loader(dataset, batch_size: int, workers: int | None, device: torch.device, shuffle=False, sampler=None,
                generator=None, drop_last=False):
    """Pinned memory on CUDA; `workers` None picks a number for the device (loader_workers)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=loader_workers(workers, device),
        pin_memory=device.type == "cuda", persistent_workers=False, generator=generator, drop_last=drop_last,
    )


def describe(device: torch.device, workers: int | None, amp: bool) -> str:
    """One line for the logs: what a command runs on, and how."""
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)}), pinned memory"
    else:
        where = f"cpu ({torch.get_num_threads()} threads)"
    numbers = f"{str(AMP_DTYPES[device.type]).removeprefix('torch.')} autocast" if amp else "float32"
    return f"{where}, channels-last, {numbers}, {loader_workers(workers, device)} loader workers"
