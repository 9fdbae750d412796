"""torch.distributed glue: misbench commands behave the same under `torchrun` as in one process."""

__all__ = ["world", "is_main", "ensure_initialized", "barrier", "block", "all_reduce_sum", "broadcast_object"]

import datetime
import os

import torch
import torch.distributed as dist

# rank 0 merges the ranks' parts while the others wait at a barrier: for ImageNet-train activations
# that outlasts NCCL's default 10-minute collective timeout
TIMEOUT_ENV = "MISBENCH_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def ensure_initialized(device: torch.device | None = None) -> None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); no-op in one process."""
    if world()[1] == 1 or dist.is_initialized():
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # resolve_device gave this rank its LOCAL_RANK GPU
    minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))


def _collective_device():
    """NCCL only reduces CUDA tensors; gloo reduces CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        device = _collective_device()
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def block(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of n items for `rank` of `size` (the first n % size get one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_sum(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
