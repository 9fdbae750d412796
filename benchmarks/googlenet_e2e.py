"""The figure the project aims at: every unit of torchvision GoogLeNet scored over an
ImageNet-val-sized generated set (50,000 JPEGs), extraction included, through the CLI.

Stages, each timed: generate the JPEGs (not part of the figure), `misbench extract googlenet
--layers conv,softmax` (random weights: nothing is downloaded), `misbench score --layer all`.
Reported per stage: seconds and images per second, and the score's own split (task selection,
embedding, decisions) with embedded/distinct images from mis.json.

    python benchmarks/googlenet_e2e.py [--images 50000] [--device cuda] [--similarity pixel]
        [--json e2e.json] [--quick]       # --quick: 450 images on CPU, the dry run of gpu_check.sh
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _wnids() -> list[str]:
    lines = (ROOT / "data" / "imagenet_wnids.txt").read_text().split()
    return [w for w in lines if w.startswith("n")]


def _write(args):
    root, start, stop, size, wnids = args
    from PIL import Image

    for i in range(start, stop):
        rng = np.random.default_rng(i)
        low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)  # smooth: JPEG-like sizes
        image = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        folder = Path(root) / wnids[i % len(wnids)]  # ImageNet's class folders: labels map as for ImageNet-val
        folder.mkdir(exist_ok=True)
        image.save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)


def generate(root: Path, n: int, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    step = 500
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        wnids = _wnids()
        list(pool.map(_write, [(str(root), s, min(n, s + step), size, wnids) for s in range(0, n, step)]))


def misbench(*args) -> float:
    cmd = [sys.executable, "-m", "misbench", *map(str, args)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(run.stdout + run.stderr)[-3000:]}")
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--similarity", default="pixel")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--workdir", default=None, help="keep the data and outputs here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.device, args.image_size, args.batch_size, args.bootstrap = 450, 64, "cpu", 16, 64, 50
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        generate(work / "val", args.images, args.size)
        t_gen = time.perf_counter() - t0
        small = ["--resize", "64", "--crop", "64"] if args.quick else []  # the dry run checks the path, not the size
        t_extract = misbench("extract", "googlenet:random", "--data", work / "val", "--layers", "conv,softmax",
                             "--out", work / "acts.h5", "--device", args.device, "--batch-size", args.batch_size,
                             "--overwrite", *small)
        t_score = misbench("score", work / "acts.h5", "--layer", "all", "--out", work / "mis.csv",
                           "--similarity", args.similarity, "--image-size", args.image_size, "--device", args.device,
                           "--batch-size", args.batch_size, "--n-boot", args.bootstrap)
        meta = json.loads((work / "mis.json").read_text())
    t = meta["timing"]
    n_units = meta["model_mean"]["n_units"] + sum(layer["n_constant"] for layer in meta["layers"].values())
    rows = [("generate JPEGs (not counted)", t_gen, args.images / t_gen),
            ("extract GoogLeNet conv+softmax", t_extract, args.images / t_extract),
            (f"score all {n_units} units ({args.similarity}, {args.image_size} px)", t_score, args.images / t_score),
            ("  score: task selection", t["select_s"], None),
            ("  score: embedding", t["embed_s"], meta["embedded_images"] / max(t["embed_s"], 1e-9)),
            ("  score: decisions", t["decide_s"], None),
            ("extract + score", t_extract + t_score, args.images / (t_extract + t_score))]
    print(f"GoogLeNet x {args.images} generated JPEGs ({args.size} px), device {args.device}, "
          f"embedded/distinct images {meta['embedded_images']}/{meta['distinct_images']}, "
          f"distances {meta.get('distances')}")
    for name, seconds, rate in rows:
        print(f"  {name:<52} {seconds:9.1f} s" + (f"  {rate:9.1f} images/s" if rate else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"images": args.images, "device": args.device, "units": n_units,
                                               "embedded_images": meta["embedded_images"],
                                               "distinct_images": meta["distinct_images"],
                                               "stages": [[n, s, r] for n, s, r in rows]}, indent=1))


if __name__ == "__main__":
    main()
