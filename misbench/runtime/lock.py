"""One writer per output: advisory locks that name their holder, on a study's folder and on every
command's output files."""

__all__ = ["DirectoryLock", "OutputLock", "lock_outputs"]

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import MisbenchError
from .fileio import option_label, utc_now

LOCK_NAME = ".misbench.lock"


class _HolderLock:
    """flock() on a lock file, held while the block runs; released by the kernel if the process dies (so a
    killed run never leaves a stale lock). A second holder is refused with the first one's pid and host."""

    def __init__(self, lock_path, target, what: str, remove: bool):
        self.path, self.target, self.what, self.remove = Path(lock_path), Path(target), what, remove
        self._fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                what, holder = self._holder(fd)
                os.close(fd)
                raise MisbenchError(f"{self.target} is in use by another {what or self.what} ({holder}): wait for it to "
                                    f"finish, or give this run another {option_label('out')}") from None
            # a lock file removed by its last holder between our open and flock: lock the new one instead
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now(),
                                   "what": self.what}).encode())
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd) -> tuple[str | None, str]:
        """(what holds it, "pid P on host H, since T"), as the holder wrote them."""
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return info.get("what"), f"pid {info['pid']} on host {info['host']}, since {info['since']}"
        except (ValueError, KeyError, OSError, AttributeError):
            return None, "holder unknown"

    def __exit__(self, *exc):
        if self.remove:  # removed while still held: a waiting opener sees the inode change and retries
            self.path.unlink(missing_ok=True)
        else:
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class DirectoryLock(_HolderLock):
    """DIR/.misbench.lock: one study per output folder (the file stays; the folder is the study's)."""

    def __init__(self, directory, what: str = "misbench study"):
        super().__init__(Path(directory) / LOCK_NAME, directory, what, remove=False)


class OutputLock(_HolderLock):
    """`.NAME.lock` beside an output file or folder, removed when released. Under torchrun rank r > 0 locks
    `.NAME.lock.rankR`: the ranks of one command share their outputs, two commands share no rank."""

    def __init__(self, output, what: str = "misbench command"):
        output = Path(output)
        rank = int(os.environ.get("RANK", 0)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 0
        name = f".{output.name}.lock" + (f".rank{rank}" if rank else "")
        super().__init__(output.with_name(name), output, what, remove=True)


_HELD: set = set()  # outputs this process holds: a writer called by another (score -> merge) locks nothing twice


@contextlib.contextmanager
def lock_outputs(paths, what: str = "misbench command"):
    """Hold an OutputLock on each of `paths` (None entries skipped) while the block runs."""
    with contextlib.ExitStack() as stack:
        for path in dict.fromkeys(Path(p).resolve() for p in paths if p):
            if path in _HELD:
                continue
            stack.enter_context(OutputLock(path, what))
            _HELD.add(path)
            stack.callback(_HELD.discard, path)
        yield
