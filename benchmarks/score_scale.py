"""Scoring at GoogLeNet scale (issue 14), on generated data: every image embedded once, memory
bounded by the chunk, and the cost of more units over the same images.

A synthetic activation file with the real layer names and unit counts of torchvision GoogLeNet
(every pre-activation conv unit, i.e. the BatchNorm outputs, plus the 1000 softmax units; random
activations) over N generated images is scored with `pixel` and `deepfeat:mobilenet_v2`, once for
1/8 of the units and once for all of them. Each run is its own process so that its peak RSS is its
own. Reported: embedded/distinct images (target 1.0), seconds per 1,000 units of the decision stage,
peak RSS against the embedding store's size, and the time ratio 8x units / 1x units (target well
under 8x: the embeddings are shared). Then the distance engines on the decision stage alone:
one FAISS call per unit (before issue 14), one FAISS call per chunk, torch per chunk (and on CUDA,
torch on the GPU and FAISS GPU's all-pairs call).

    python benchmarks/score_scale.py [--images 5000] [--image-size 64] [--backends pixel,deepfeat:mobilenet_v2@32]
        [--quick]

A backend written NAME@S scores at S pixels instead of --image-size: deepfeat:mobilenet_v2 at 64 px has
31,232 dims per image (2.5x pixel's 12,288), which makes its all-units run take most of an hour on 2
cores; at 32 px (7,808 dims) the same measurement (shared embeddings vs units) takes minutes.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import generated_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def googlenet_units() -> dict[str, int]:
    import torch
    import torchvision

    from misbench.activations.hooks import resolve_layers

    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    modules = dict(model.named_modules())
    probe = torch.zeros(1, 3, 64, 64)
    units = {r.name: modules[r.module].num_features for r in resolve_layers(model, ["conv"], probe)}
    return {**units, "softmax": 1000}


def make_acts(root: Path, n_images: int, units: dict[str, int], scale: float) -> Path:
    from conftest import write_acts

    folder = generated_folder(root / "images", n_images, size=64, classes=10)
    rng = np.random.default_rng(0)
    layers = {name: rng.standard_normal((n_images, max(1, round(u * scale))), dtype=np.float32)
              for name, u in units.items()}
    return write_acts(root / "acts.h5", folder, layers)


def child(args) -> None:
    """One score run in this process; prints its mis.json figures and peak RSS as JSON."""
    from misbench.scoring.run import ScoreSettings, score
    from misbench.similarity import build_backend

    import faiss  # noqa: F401  (loaded lazily by scoring: part of the libraries, not of the run)

    backend = build_backend(args.similarity, image_size=args.image_size)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # libraries and the backend loaded
    settings = ScoreSettings(similarity=args.similarity, image_size=args.image_size, device=args.device,
                             n_boot=args.n_boot, chunk_units=args.chunk_units, workers=0)
    t0 = time.perf_counter()
    meta = score(args.acts, args.layers.split(","), settings, Path(args.out), backend=backend,
                 overwrite=True)  # one temp file per size, rewritten for each backend
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "timing": meta["timing"], "embedded": meta["embedded_images"],
                      "distinct": meta["distinct_images"], "units": meta["model_mean"]["n_units"],
                      "base_rss": base_rss,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_child(acts, layers, similarity, out, args, image_size, chunk_units=256) -> dict:
    cmd = [sys.executable, __file__, "--child", "--acts", str(acts), "--layers", ",".join(layers),
           "--similarity", similarity, "--out", str(out), "--image-size", str(image_size),
           "--device", args.device, "--n-boot", str(args.n_boot), "--chunk-units", str(chunk_units)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"score run failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def embedding_dim(similarity: str, image_size: int) -> int:
    import torch

    from misbench.similarity import build_backend

    backend = build_backend(similarity, image_size=image_size).eval()
    with torch.no_grad():
        return int(backend.embed(torch.zeros(1, 3, image_size, image_size)).shape[1])


def engines(n_rows: int, dim: int, units: int, device: str, repeats: int = 3) -> list[tuple[str, float]]:
    """Seconds for the distances of one chunk of `units` units (20 tasks, 9 explanations)."""
    import torch

    from misbench.similarity.index import EmbeddingIndex, GramDistances, TorchDistances

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n_rows, dim), dtype=np.float32)
    rows = np.arange(n_rows)
    queries = [rng.integers(0, n_rows, 40) for _ in range(units)]
    targets = [np.tile(rng.integers(0, n_rows, (20, 18)), (2, 1)) for _ in range(units)]
    index, torch_cpu, gram = EmbeddingIndex(rows, emb), TorchDistances(rows, emb, "cpu"), GramDistances(rows, emb)
    tasks_q = np.concatenate([q.reshape(2, -1).T for q in queries])  # each task's q+ and q- share its targets
    tasks_t = np.concatenate([t[:len(t) // 2] for t in targets])
    cases = {"FAISS CPU, one call per unit (before)": lambda: [index.distances(q, t) for q, t in zip(queries, targets)],
             "FAISS CPU, one call per chunk": lambda: index.distances(np.concatenate(queries), np.concatenate(targets)),
             "torch CPU, one call per chunk": lambda: torch_cpu.distances(np.concatenate(queries),
                                                                          np.concatenate(targets)),
             "gram CPU (the default), one call per chunk": lambda: gram.task_distances(tasks_q, tasks_t)}
    if device.startswith("cuda") and torch.cuda.is_available():
        torch_gpu = TorchDistances(rows, emb, device)

        def on_gpu():
            out = torch_gpu.distances(np.concatenate(queries), np.concatenate(targets))
            torch.cuda.synchronize()
            return out
        cases["torch GPU, one call per chunk"] = on_gpu
        import faiss

        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and hasattr(faiss, "pairwise_distance_gpu"):
            resources = faiss.StandardGpuResources()

            def faiss_gpu():  # all pairs of a unit's queries and targets, then the needed ones
                out = []
                for q, t in zip(queries, targets):
                    d = faiss.pairwise_distance_gpu(resources, emb[q], emb[t.ravel()])
                    out.append(d.reshape(len(q), len(q), -1)[np.arange(len(q)), np.arange(len(q))])
                return out
            cases["FAISS GPU all-pairs per unit"] = faiss_gpu
    results = []
    for name, fn in cases.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        results.append((name, (time.perf_counter() - t0) / repeats))
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of GoogLeNet's unit counts per layer")
    parser.add_argument("--backends", default="pixel,deepfeat:mobilenet_v2@32", help="NAME[@IMAGE_SIZE],...")
    parser.add_argument("--quick", action="store_true", help="the test suite's size: 600 images, 1/40 of the units")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--acts"), parser.add_argument("--layers"), parser.add_argument("--similarity")
    parser.add_argument("--out"), parser.add_argument("--chunk-units", type=int, default=256)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.images, args.scale, args.image_size, args.n_boot, args.backends = 600, 1 / 40, 32, 50, "pixel"
    units = googlenet_units()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        acts = make_acts(tmp, args.images, units, args.scale)
        total = sum(max(1, round(u * args.scale)) for u in units.values())
        print(f"GoogLeNet-shaped activations: {len(units)} layers, {total} units, {args.images} generated images "
              f"({time.perf_counter() - t0:.0f} s to generate); image size {args.image_size}, device {args.device}")
        names = list(units)
        eighth, count = [], 0  # the first layers holding about 1/8 of the units
        for name in names:
            if count >= total / 8:
                break
            eighth.append(name)
            count += max(1, round(units[name] * args.scale))
        for spec in args.backends.split(","):
            similarity, _, size = spec.partition("@")
            size = int(size or args.image_size)
            dim = embedding_dim(similarity, size)
            small = run_child(acts, eighth, similarity, tmp / "small.csv", args, size)
            full = run_child(acts, names, similarity, tmp / "full.csv", args, size)
            store = full["distinct"] * dim * 4
            print(f"\n{similarity} at {size} px: {dim} dims per image")
            for label, r in ((f"{len(eighth)} layers", small), ("all layers", full)):
                t = r["timing"]
                print(f"  {label:<12} {r['units']:>6} units: embedded/distinct {r['embedded']}/{r['distinct']} = "
                      f"{r['embedded'] / r['distinct']:.2f} (target 1.0); total {r['seconds']:.1f} s = select "
                      f"{t['select_s']:.1f} + embed {t['embed_s']:.1f} + decide {t['decide_s']:.1f}; decision stage "
                      f"{t['decide_s'] / r['units'] * 1000:.1f} s per 1,000 units; peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
                      f"{(r['peak_rss'] - r['base_rss']) / 2**20:.0f} MiB above the process with libraries loaded")
            print(f"  embedding store {store / 2**20:.0f} MiB ({full['distinct']} images x {dim} dims x 4 B); "
                  f"peak RSS growth / store = {(full['peak_rss'] - full['base_rss']) / store:.2f}")
            print(f"  {full['units'] / small['units']:.1f}x the units over the same images: "
                  f"{full['seconds'] / small['seconds']:.2f}x the time (target well under 8x)")
        first, _, size = args.backends.split(",")[0].partition("@")
        dim = embedding_dim(first, int(size or args.image_size))
        chunk = 16 if args.quick else 256
        print(f"\ndistance engines, decision stage of one {chunk}-unit chunk ({args.images} images x {dim} dims):")
        timings = engines(args.images, dim, chunk, args.device)
        base = timings[0][1]
        for name, seconds in timings:
            print(f"  {name:<40} {seconds * 1000:9.1f} ms   {base / seconds:6.2f}x")


if __name__ == "__main__":
    main()
