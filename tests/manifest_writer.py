"""A manifest writer for test_slurm's concurrent-writers test, in a module of its own: a spawned process imports
only this and misbench.studies.manifest, not the test module (torch, click, the CLI)."""

import time

from misbench.studies.manifest import Manifest


def write_records(path, worker, n, start):
    while time.time() < start:
        pass
    manifest = Manifest(path)
    for i in range(n):
        manifest.record(f"step-{worker}-{i}", status="done", worker=worker)
