"""The one check every writing command makes before any work: its outputs against all its inputs, and a
lock on each output so that a second writer is refused instead of sharing (and corrupting) a file."""

__all__ = ["writing", "flatten_paths"]

import contextlib
from pathlib import Path

from .fileio import refuse_same_paths
from .lock import lock_outputs


def flatten_paths(mapping: dict) -> dict:
    """{name: path | [paths] | None} -> {name: path} (a folder's files get `name (file)` names)."""
    flat = {}
    for name, value in mapping.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{name} ({Path(str(p)).name})": p for p in value if p})
        elif value:
            flat[name] = value
    return flat


@contextlib.contextmanager
def writing(outputs: dict, inputs: dict | None = None, what: str = "misbench command"):
    """Refuse an output that is one of `inputs` (give every file the command reads: sidecars such as mis.json,
    tasks.h5 and dictionaries included) or another output; then hold a lock on each output while the block
    runs, so that a second command writing one of them is refused naming this process (misbench.runtime.lock).

    `outputs`/`inputs` map an option name ("--out", "ACTS") to a path, a list of paths, or None."""
    outputs = flatten_paths(outputs)
    refuse_same_paths(flatten_paths(inputs or {}), outputs)
    with lock_outputs(outputs.values(), what):
        yield
