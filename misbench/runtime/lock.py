"""One writer per output directory: an advisory lock that names its holder."""

__all__ = ["DirectoryLock"]

import fcntl
import json
import os
import socket
from pathlib import Path

from ..errors import MisbenchError
from .fileio import utc_now

LOCK_NAME = ".misbench.lock"


class DirectoryLock:
    """flock() on DIR/.misbench.lock, held while the block runs; released by the kernel if the process dies
    (so a killed run never leaves a stale lock). A second holder is refused with the first one's pid and host."""

    def __init__(self, directory, what: str = "misbench study"):
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise MisbenchError(f"{self.path.parent} is in use by another {self.what} ({holder}): wait for it to "
                                "finish, or give this run another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
        except (ValueError, KeyError, OSError):
            return "holder unknown"

    def __exit__(self, *exc):
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
