"""The study manifest: every step's inputs, outputs (sha256), settings, timings and status.

One file, the single truth for every executor. Many writers (the Slurm jobs of one study, finishing in the same
second on different nodes) update it as read-modify-write under a POSIX lock on `manifest.json.lock` (fcntl
locks work across the nodes of an NFS mount), with an atomic rename: each update re-reads what the others wrote,
so none is lost and a reader never sees half a file."""

__all__ = ["Manifest", "step_key", "folder_fingerprint", "manifest_path"]

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

from ..errors import MisbenchError
from ..runtime.fileio import sha256_file, write_json


def step_key(kind: str, settings: dict, input_hashes: dict) -> str:
    blob = json.dumps({"kind": kind, "settings": settings, "inputs": input_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def folder_fingerprint(root) -> str:
    """sha256 of every file's path (relative to `root`), size and mtime, in sorted order: one stat per file
    (seconds for ImageNet-train), no reads. An image regenerated in place, added or removed changes it; so
    does a copy that does not keep mtimes (a rerun, never a stale cache)."""
    digest = hashlib.sha256()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def manifest_path(out_dir) -> Path:
    return Path(out_dir) / "manifest.json"


class Manifest:
    """manifest.json in the study folder, saved atomically after every update; `read_only` ones never write
    (the ranks other than 0 of a distributed step)."""

    def __init__(self, path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self.data = self._read() if self.path.exists() else {"steps": {}}
        self._hash_cache = {}
        for entry in self.data["steps"].values():
            for record in list(entry.get("outputs", {}).values()) + list(entry.get("inputs", {}).values()):
                if isinstance(record, dict) and record.get("path"):
                    self._hash_cache[(record["path"], record.get("size"), record.get("mtime_ns"))] = record["sha256"]

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("steps"), dict) or \
                    not all(isinstance(e, dict) for e in data["steps"].values()):
                raise ValueError("expected an object with a 'steps' object of step records")
        except (ValueError, UnicodeDecodeError) as err:
            raise MisbenchError(f"{self.path} is damaged ({err}): restore it, or move it away to rerun every step "
                                "(finished outputs are then recomputed)") from None
        return data

    @contextlib.contextmanager
    def _locked(self):
        """The lock every writer holds while it reads, changes and replaces the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)

    def update(self, change) -> dict:
        """change(data) on the file's current content, written back atomically under the lock; self.data becomes
        the result (what the other writers recorded meanwhile included)."""
        if self.read_only:
            change(self.data)
            return self.data
        with self._locked():
            data = self._read() if self.path.exists() else {"steps": {}}
            change(data)
            write_json(self.path, data)
        self.data = data
        return data

    def save(self, **fields):
        """Set top-level fields (the study's name, config) without touching any step's record."""
        self.update(lambda data: data.update(fields))

    def refresh(self) -> dict:
        self.data = self._read() if self.path.exists() else {"steps": {}}
        return self.data

    def file_record(self, path) -> dict:
        """sha256 of a file; reused from the manifest while its size and mtime are unchanged."""
        path = Path(path)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hash_cache:
            self._hash_cache[key] = sha256_file(path)
        return {"path": str(path), "sha256": self._hash_cache[key], "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def entry(self, name: str) -> dict | None:
        return self.data["steps"].get(name)

    def is_current(self, name: str, key: str) -> bool:
        entry = self.entry(name)
        if not entry or entry.get("status") != "done" or entry.get("key") != key:
            return False
        for record in entry["outputs"].values():
            path = Path(record["path"])
            if not path.exists():
                return False
            stat = path.stat()
            if (stat.st_size, stat.st_mtime_ns) != (record["size"], record["mtime_ns"]):
                if sha256_file(path) != record["sha256"]:
                    return False
        return True

    def record(self, name: str, **fields):
        """Merge `fields` into step `name`'s record (a field given as None is removed)."""
        def change(data):
            entry = {**data["steps"].get(name, {}), **fields}
            data["steps"][name] = {k: v for k, v in entry.items() if v is not None}
        self.update(change)
