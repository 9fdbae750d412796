"""Scoring cost per unit against units, and the decision stage against the memory bound (issue 25).

A synthetic activation file with torchvision GoogLeNet's layer names and unit counts (7,280 conv
units + 1,000 softmax units = 8,280; random activations) over N generated images is scored with
each backend for a growing prefix of its layers (about 100, 1,000 and all 8,280 units), each run
in its own process. Reported per run:

- fixed cost (the embedding stage: every distinct image embedded once) and cost per unit
  ((total - embedding) / units: selection, distances, decisions, intervals, writing);
- the decision stage as a multiple of the memory bound: the time a plain numpy read (a sum over
  rows) of the embedding store's own array takes, scaled to the bytes that the units' tasks
  touch (each unit's distinct images x dims x 4 B, summed over units), measured in the same
  process right after the score. Target (issue 25): at most 2x for lpips-alex, deepfeat and pixel.

    python benchmarks/decide_bound.py [--backends lpips-alex@64/450,pixel@64/2000,deepfeat:mobilenet_v2@32/2000]
        [--units 100,1000,8280] [--n-boot 1000] [--distances faiss,gram] [--quick]

A backend is written NAME@IMAGE_SIZE/IMAGES. lpips-alex and deepfeat use random trunks (no weights
are downloaded): the distances cost the same whatever the weights.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_scale import googlenet_units, make_acts  # noqa: E402


def build(similarity: str, image_size: int):
    import torchvision

    from misbench.similarity import build_backend

    if similarity.startswith("lpips-"):
        return build_backend(similarity, image_size=image_size, pretrained=False)
    if similarity.startswith("deepfeat:"):
        from misbench.similarity.deepfeat import DeepFeatBackend

        arch = similarity.split(":")[1]
        return DeepFeatBackend(arch, image_size=image_size, model=torchvision.models.get_model(arch, weights=None))
    return build_backend(similarity, image_size=image_size)


def read_bandwidth(emb: np.ndarray, repeats: int = 5) -> float:
    """Bytes per second of the fastest of `repeats` plain reads (a sum over rows) of the whole array."""
    emb.sum(axis=0)  # warm
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb.sum(axis=0)
        best = min(best, time.perf_counter() - t0)
    return emb.nbytes / best


def touched_rows(tasks_path: Path) -> int:
    """Sum over scored units of the distinct images their tasks touch (tasks.h5, docs/formats.md)."""
    import h5py

    total = 0
    with h5py.File(tasks_path, "r") as h5:
        for group in h5.values():
            parts = [group[k][...].reshape(group[k].shape[0], -1) for k in ("pos_expl", "neg_expl", "pos_query",
                                                                           "neg_query")]
            rows = np.concatenate(parts, axis=1)
            for unit in rows:
                if unit[0] >= 0:
                    total += len(np.unique(unit))
    return total


def child(args) -> None:
    """One score run in this process; prints its timings, touched bytes and the read bandwidth as JSON."""
    import torch

    import misbench.scoring.run as run

    torch.manual_seed(0)
    backend = build(args.similarity, args.image_size)
    stores = []
    original = run.build_distances

    def capture(name, rows, embeddings, device, *rest, **kw):  # the decision stage's own array
        stores.append(embeddings)
        return original(name, rows, embeddings, device, *rest, **kw)

    run.build_distances = capture
    settings = run.ScoreSettings(similarity=args.similarity, image_size=args.image_size, device="cpu",
                                 n_boot=args.n_boot, workers=0, distances=args.distances)
    out = Path(args.out)
    meta = run.score(args.acts, args.layers.split(","), settings, out, tasks_out=out.with_suffix(".h5"),
                     backend=backend, overwrite=True)
    emb = stores[0]
    bandwidth = read_bandwidth(emb)
    touched = touched_rows(out.with_suffix(".h5"))
    print(json.dumps({"timing": meta["timing"], "units": meta["model_mean"]["n_units"], "dim": int(emb.shape[1]),
                      "store_rows": int(emb.shape[0]), "bandwidth": bandwidth,
                      "touched_bytes": touched * emb.shape[1] * 4, "engines": len(stores)}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="lpips-alex@64/450,pixel@64/2000,deepfeat:mobilenet_v2@32/2000",
                        help="NAME@IMAGE_SIZE/IMAGES,...")
    parser.add_argument("--units", default="100,1000,8280", help="about how many units per run (a prefix of layers)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--distances", default="auto", help="engines to compare, e.g. faiss,gram (the one before "
                        "issue 25, and the CPU default since)")
    parser.add_argument("--quick", action="store_true", help="a dry run: lpips-alex over 450 images, ~100 units")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--acts"), parser.add_argument("--layers"), parser.add_argument("--similarity")
    parser.add_argument("--out"), parser.add_argument("--image-size", type=int)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.backends, args.units, args.n_boot = "lpips-alex@64/450", "100", 100
    units = googlenet_units()
    names = list(units)
    with tempfile.TemporaryDirectory(prefix="decide-bound-") as tmp:
        tmp = Path(tmp)
        files = {}
        for spec in args.backends.split(","):
            name, _, rest = spec.partition("@")
            size, _, images = rest.partition("/")
            images = int(images)
            if images not in files:
                files[images] = make_acts(tmp / f"n{images}", images, units, 1.0)
            print(f"\n{name} at {size} px over {images} images (GoogLeNet-shaped activations, random)", flush=True)
            for target in map(int, args.units.split(",")):
                layers, count = [], 0
                for layer in names:
                    if count >= target:
                        break
                    layers.append(layer)
                    count += units[layer]
                for engine in args.distances.split(","):
                    cmd = [sys.executable, __file__, "--child", "--acts", str(files[images]), "--layers",
                           ",".join(layers), "--similarity", name, "--out", str(tmp / "mis.csv"), "--image-size", size,
                           "--n-boot", str(args.n_boot), "--distances", engine]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"score run failed:\n{done.stderr[-3000:]}")
                    report(json.loads(done.stdout.strip().splitlines()[-1]), engine)


def report(r: dict, engine: str) -> None:
    t, n = r["timing"], r["units"]
    per_unit = (t["total_s"] - t["embed_s"]) / n
    bound = r["touched_bytes"] / r["bandwidth"]
    print(f"  {n:>5} units, {r['dim']} dims, --distances {engine}: total {t['total_s']:.1f} s = fixed (embed) "
          f"{t['embed_s']:.1f} s + {per_unit * 1000:.2f} ms/unit (select {t['select_s']:.1f} + decide "
          f"{t['decide_s']:.1f} s + writing); decision stage {t['decide_s']:.2f} s vs reading the touched embeddings "
          f"({r['touched_bytes'] / 2**30:.2f} GiB at {r['bandwidth'] / 1e9:.1f} GB/s, store {r['store_rows']} x "
          f"{r['dim']}) {bound:.2f} s: {t['decide_s'] / bound:.2f}x the bound (target <= 2x)", flush=True)

if __name__ == "__main__":
    main()
