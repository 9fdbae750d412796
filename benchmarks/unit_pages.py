"""Page weight of the unit pages at GoogLeNet scale (issue 23), on generated data.

A synthetic activation file with torchvision GoogLeNet's layer names and unit counts (57 BatchNorm layers,
7,280 conv units, plus 1,000 softmax units = 8,280), a mis.csv and a tasks.h5 for every unit (20 tasks
of 9 explanations, random rows) over N generated images; the unit pages of all 8,280 units are written with
thumbnails of smooth generated pictures (a coarse random colour field upsampled, plus mild noise: about as
compressible as a downsampled photo; pure noise would be the worst case). Reported: the weight of every
layer index page with every thumbnail it shows (the budget: units.INDEX_BYTES_PER_UNIT per unit listed, i.e.
< 50 MB for all 8,280), the heaviest unit page with its images (units.UNIT_PAGE_BYTES), thumbnails made
(one per image, not per unit), the folder's size and the time, against the time of writing the same
pages' HTML alone (baseline run in the same process).

    python benchmarks/unit_pages.py [--images 5000] [--quick]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from _common import generated_folder
from score_scale import googlenet_units

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def smooth_thumbnails(size: int):
    def thumbs(acts, rows):
        out = []
        for r in np.asarray(rows).tolist():
            rng = np.random.default_rng(r)
            coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
            up = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
            out.append(np.clip(up + rng.normal(0, 6, up.shape), 0, 255).astype(np.uint8))
        return out
    return thumbs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="1/20 of the units, 1,000 images")
    args = parser.parse_args()
    from conftest import write_acts
    from misbench.reports.tables import read_scores
    from misbench.reports.units import (INDEX_BYTES_PER_UNIT, THUMB_SIZE, UNIT_PAGE_BYTES, page_weight, unit_pages)

    scale, n = (0.05, 1000) if args.quick else (1.0, args.images)
    units = {name: max(1, round(u * scale)) for name, u in googlenet_units().items()}
    total = sum(units.values())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="unit-pages-") as tmp:
        tmp = Path(tmp)
        folder = generated_folder(tmp / "images", n, size=16, classes=10)
        acts = write_acts(tmp / "acts.h5", folder, {name: rng.standard_normal((n, u), dtype=np.float32)
                                                     for name, u in units.items()})
        lines = ["layer,unit,status,mis,mis_confidence,mis_ci_low,mis_ci_high,conf_ci_low,conf_ci_high,n_tasks"]
        with h5py.File(tmp / "tasks.h5", "w") as t:
            for name, u in units.items():
                g = t.create_group(name)
                g["unit"] = np.arange(u)
                g["pos_expl"] = rng.integers(0, n, (u, 20, 9))
                g["neg_expl"] = rng.integers(0, n, (u, 20, 9))
                g["pos_query"] = rng.integers(0, n, (u, 20))
                g["neg_query"] = rng.integers(0, n, (u, 20))
                g["delta"] = rng.normal(size=(u, 20))
                for k in range(u):
                    m, c = rng.random(2)
                    lines.append(f"{name},{k},ok,{m:.3f},{c:.4f},{m / 2:.3f},{min(1, m + .1):.3f},{c - .05:.4f},"
                                 f"{c + .05:.4f},20")
        (tmp / "mis.csv").write_text("\n".join(lines) + "\n")
        scores = read_scores(tmp / "mis.csv")
        # baseline: the same pages without thumbnails to make (the images already there), same process
        t0 = time.perf_counter()
        made = unit_pages(tmp / "report", "control", scores, acts, tmp / "tasks.h5", thumbs=smooth_thumbnails(THUMB_SIZE))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        unit_pages(tmp / "report", "control", scores, acts, tmp / "tasks.h5", thumbs=smooth_thumbnails(THUMB_SIZE))
        html_only = time.perf_counter() - t0
        units_dir = tmp / "report" / "units"
        indexes = sorted((units_dir / "control").glob("*/index.html"))
        index_weight = sum(page_weight(p) for p in indexes)
        heaviest = max(page_weight(p) for p in (units_dir / "control").glob("*/[0-9]*.html"))
        thumbs = list((units_dir / "img").glob("*.jpg"))
        folder_bytes = sum(p.stat().st_size for p in units_dir.rglob("*") if p.is_file())
        budget = INDEX_BYTES_PER_UNIT * total
        print(f"GoogLeNet-shaped: {len(units)} layers, {total} units, {n} generated images, "
              f"{THUMB_SIZE}px JPEG thumbnails")
        print(f"layer index pages with their thumbnails: {index_weight / 1e6:.1f} MB for {total} units "
              f"({index_weight / total:.0f} B per unit; budget {budget / 1e6:.1f} MB): "
              f"{'within' if index_weight <= budget else 'OVER'} budget")
        print(f"heaviest unit page with its images: {heaviest / 1e3:.1f} KB (budget {UNIT_PAGE_BYTES / 1e3:.0f} KB): "
              f"{'within' if heaviest <= UNIT_PAGE_BYTES else 'OVER'} budget")
        print(f"thumbnails: {len(thumbs)} made for {n} images ({made['n_thumbnails']} on the first build, "
              f"mean {np.mean([p.stat().st_size for p in thumbs]):.0f} B); units/ folder {folder_bytes / 1e6:.1f} MB")
        print(f"time: {first:.1f} s with thumbnails, {html_only:.1f} s pages alone (thumbnails reused): "
              f"{first / html_only:.2f}x")
        shutil.rmtree(tmp / "report")


if __name__ == "__main__":
    main()
