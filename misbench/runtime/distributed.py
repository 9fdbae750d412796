"""torch.distributed glue: misbench commands behave the same under `torchrun` as in one process."""

__all__ = ["world", "is_main", "ensure_initialized", "barrier", "block", "all_reduce_sum", "broadcast_object", "Watchdog"]

import datetime
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from .interrupts import committing

# rank 0 merges the ranks' parts while the others wait at a barrier: for ImageNet-train activations
# that outlasts NCCL's default 10-minute collective timeout
TIMEOUT_ENV = "MISBENCH_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120
# a rank whose peer died must not wait out that timeout: every rank beats a counter in torchrun's store, and a
# peer whose counter stands still this long is taken for dead (it cannot be merging: its beat is a thread)
PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S, BEAT_S = "MISBENCH_DIST_PEER_TIMEOUT_S", 300.0, 5.0  # beat: at most
# SIGTERM is handled in Python, which cannot run while the main thread is blocked in a collective: a rank still
# alive this long after a SIGTERM (or at once after a second one) ends itself
TERM_GRACE_ENV, DEFAULT_TERM_GRACE_S = "MISBENCH_TERM_GRACE_S", 10.0


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
    Watchdog(dist.distributed_c10d._get_default_store(), *world()).start()


def _end(message: str, code: int) -> None:
    """End the process now: its main thread may be blocked in a collective that never returns."""
    print(f"Error: {message}", file=sys.stderr, flush=True)
    os._exit(code)


class Watchdog:
    """A daemon thread per rank: beats this rank's counter in the store, watches the peers' counters, and ends
    the process when a peer stops beating for PEER_TIMEOUT (dead or hung) or when a SIGTERM is not acted on
    within TERM_GRACE (the main thread blocked in a collective) or comes twice. SIGTERMs reach it through
    signal.set_wakeup_fd, written by the C-level handler even while the main thread is blocked."""

    def __init__(self, store, rank: int, size: int, peer_timeout: float | None = None, grace: float | None = None,
                 beat: float = BEAT_S):
        self.store, self.rank, self.size = store, rank, size
        self.peer_timeout = float(os.environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S)) if peer_timeout is None \
            else peer_timeout
        self.beat = min(beat, self.peer_timeout / 4)
        self.grace = float(os.environ.get(TERM_GRACE_ENV, DEFAULT_TERM_GRACE_S)) if grace is None else grace
        self.terms, self.term_at = 0, None
        self._wake = None

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(write, False)
            os.set_blocking(read, False)
            try:
                signal.set_wakeup_fd(write, warn_on_full_buffer=False)
                self._wake = read
            except ValueError:  # not the main interpreter
                os.close(read)
                os.close(write)
        threading.Thread(target=self._run, name="misbench-watchdog", daemon=True).start()

    def _signals(self) -> list[int]:
        if self._wake is None:
            return []
        try:
            return list(os.read(self._wake, 64))
        except BlockingIOError:
            return []

    def _run(self) -> None:
        seen = {r: (None, time.monotonic()) for r in range(self.size) if r != self.rank}
        count, last_beat = 0, 0.0
        while True:
            now = time.monotonic()
            for signum in self._signals():
                if signum == signal.SIGTERM:
                    self.terms += 1
                    self.term_at = self.term_at or now
                    if self.terms > 1:
                        _end(f"rank {self.rank}: second SIGTERM: ending now", 143)
            if self.term_at is not None and committing():  # a commit ends first (interrupts.py), then the stop
                self.term_at = now
            if self.term_at is not None and now - self.term_at > self.grace:
                _end(f"rank {self.rank}: SIGTERM not acted on within {self.grace:g} s (blocked waiting for other "
                     "ranks): ending now; rerun the command (with --resume where it exists)", 143)
            if now - last_beat >= self.beat:
                last_beat = now
                count += 1
                try:
                    self.store.set(f"misbench/beat/{self.rank}", str(count))
                    for r, (value, since) in seen.items():
                        key = f"misbench/beat/{r}"
                        current = self.store.get(key) if self.store.check([key]) else None
                        if current != value:
                            seen[r] = (current, now)
                        elif now - since > self.peer_timeout:
                            _end(f"rank {self.rank}: rank {r} has not answered for {now - since:.0f} s (killed or "
                                 f"hung; {PEER_TIMEOUT_ENV} sets the limit): ending this rank too", 1)
                except Exception as err:  # noqa: BLE001 - the store went with torchrun's agent or rank 0
                    _end(f"rank {self.rank}: lost the ranks' store ({type(err).__name__}: {err}): the other ranks "
                         "or torchrun are gone; ending this rank too", 1)
            time.sleep(0.1)


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
