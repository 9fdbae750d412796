"""MIS with the embedding engine (FAISS) vs the pairwise engine (metric on every pair).

Target (issue 3): 100 units x 20 tasks, lpips-alex (random trunk), 64 px, CPU: identical
scores, embedding engine >= 20x faster. Memory of the embedding engine is bounded by the
embeddings of the images in use (printed), never an N x N matrix.
"""

import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from _common import Timer, generated_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_acts  # noqa: E402

from misbench.scoring.run import ScoreSettings, score  # noqa: E402
from misbench.similarity.lpips import LpipsBackend  # noqa: E402


def main(units=100, n_images=600):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = generated_folder(tmp / "images", n_images, size=64)
        rng = np.random.default_rng(0)
        acts = write_acts(tmp / "acts.h5", folder, {"layer": rng.normal(size=(n_images, units))})
        backend = LpipsBackend("alex", trunk=torchvision.models.alexnet(weights=None).features)
        results, times = {}, {}
        for engine in ("embed", "pairwise"):
            settings = ScoreSettings(similarity="lpips-alex", image_size=64, engine=engine, device="cpu", n_boot=100)
            with Timer() as t:
                meta = score(acts, ["layer"], settings, tmp / f"{engine}.csv", backend=backend)
            times[engine] = t.seconds
            with open(tmp / f"{engine}.csv") as handle:
                results[engine] = [r["mis"] for r in csv.DictReader(handle)]
            if engine == "embed":
                dims = meta["timing"]
        same = results["embed"] == results["pairwise"]
        print(f"{units} units x 20 tasks, lpips-alex random trunk, 64 px, CPU threads {torch.get_num_threads()}")
        print(f"embed engine   : {times['embed']:8.2f} s  ({times['embed'] / units * 1000:.1f} ms/unit)")
        print(f"pairwise engine: {times['pairwise']:8.2f} s  ({times['pairwise'] / units * 1000:.1f} ms/unit)")
        print(f"speed-up       : {times['pairwise'] / times['embed']:.1f}x  (target >= 20x); identical mis: {same}")
        emb_bytes = n_images * 31872 * 4
        print(f"embedding memory bound: <= {n_images} images x 31872 dims x 4 B = {emb_bytes / 2**20:.0f} MiB ({dims})")


if __name__ == "__main__":
    main()
