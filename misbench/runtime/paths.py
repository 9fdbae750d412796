"""Where misbench keeps its own files (datasets it staged, embedding caches)."""

__all__ = ["misbench_home"]

import os
from pathlib import Path


def misbench_home() -> Path:
    """$MISBENCH_HOME, else $XDG_CACHE_HOME/misbench, else ~/.cache/misbench."""
    if os.environ.get("MISBENCH_HOME"):
        return Path(os.environ["MISBENCH_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "misbench"
