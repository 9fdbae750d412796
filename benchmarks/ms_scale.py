"""The MonoSemanticity score at scale (issue 24 item 5), on synthetic embeddings and activations.

1. Speed against the brute force: the O(N^2) computation as other implementations do it (the N x N cosine
   matrix computed once, then per unit the activation-weighted sum over its pairs) against misbench's
   O(N d) identity, on the same N images x U units; both in float64, max |difference| printed.
2. Throughput at full size: 50,000 images x 10,000 units (float16 activations, as extract stores them) with
   768-dim embeddings (a ViT-B width); seconds and units per second. The brute force at that size is
   extrapolated from its measured per-unit time (x N^2), never run.

    python benchmarks/ms_scale.py [--images 50000] [--units 10000] [--dims 768] [--brute-images 2000]
        [--brute-units 50] [--device cpu] [--quick]
"""

import argparse

import numpy as np
import torch
from _common import Timer

from misbench.scoring.ms import ms_scores


def brute_force(acts: np.ndarray, emb: np.ndarray) -> np.ndarray:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = e @ e.T  # [N, N]
    out = np.empty(acts.shape[1])
    upper = np.triu(np.ones_like(cos, dtype=bool), 1)
    for u in range(acts.shape[1]):
        a = acts[:, u].astype(np.float64)
        a = (a - a.min()) / (a.max() - a.min())
        w = np.outer(a, a)[upper]
        out[u] = (w * cos[upper]).sum() / w.sum()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--brute-images", type=int, default=2000)
    parser.add_argument("--brute-units", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.units, args.dims, args.brute_images, args.brute_units = 3000, 200, 64, 300, 10
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")

    n, u = args.brute_images, args.brute_units
    emb = rng.standard_normal((n, args.dims)) + 0.5
    acts = np.maximum(rng.standard_normal((n, u)), 0).astype(np.float32)
    with Timer() as t_brute:
        ref = brute_force(acts, emb)
    with Timer() as t_fast:
        fast = ms_scores(acts, emb, device=args.device)
    print(f"brute force vs identity, {n} images x {u} units x {args.dims} dims: brute {t_brute.seconds:.3f} s, "
          f"identity {t_fast.seconds:.4f} s, speed-up {t_brute.seconds / t_fast.seconds:.0f}x, "
          f"max |difference| {np.abs(fast - ref).max():.2e}")
    per_unit_brute = t_brute.seconds / u

    n, u = args.images, args.units
    emb = rng.standard_normal((n, args.dims), dtype=np.float32) + 0.5
    acts = np.empty((n, u), np.float16)
    for start in range(0, u, 1000):
        acts[:, start:start + 1000] = np.maximum(rng.standard_normal((n, min(1000, u - start)), np.float32), 0)
    with Timer() as t:
        ms = ms_scores(acts, emb, device=args.device)
    assert np.isfinite(ms).all()
    brute_estimate = per_unit_brute * u * (n / args.brute_images) ** 2
    print(f"throughput, {n} images x {u} units x {args.dims} dims: {t.seconds:.1f} s, {u / t.seconds:.0f} units/s; "
          f"brute force extrapolated {brute_estimate:.0f} s (x{brute_estimate / t.seconds:.0f})")


if __name__ == "__main__":
    main()
