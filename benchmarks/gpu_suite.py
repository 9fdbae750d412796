"""GPU throughput of misbench's hot paths, printed as one table (run by gpu_suite.sh).

Measures: extraction images/s (GoogLeNet, batch 256, all conv units + softmax, vs a bare forward
loop on the same loader), embedding images/s per similarity backend (random trunks: no weights
needed), MIS units/s (embedding engine, FAISS GPU index when available), training steps with masks
enforced (GoogLeNet, MiniInception; AMP), and misbench's collectives with a DDP step in a one-process
NCCL group. Each part also checks what it measures (masks hold, gradient layouts match DDP's
buckets, collectives return what they should). Data are generated in memory.

    python benchmarks/gpu_suite.py [--json FILE]            # the suite, on CUDA
    python benchmarks/gpu_suite.py --device cpu --quick     # the same code at toy sizes (tested)
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misbench.datasets.sources import ArraySource, TransformedDataset  # noqa: E402
from misbench.runtime.device import make_loader, precision, prepare_model, to_device  # noqa: E402
from misbench.activations.extract import ExtractSettings, extract  # noqa: E402
from misbench.models.loading import load_model  # noqa: E402
from misbench.models.preprocess import Preprocess, build_transform  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The workload; --quick shrinks it to seconds on a CPU so that tests run every line of the suite."""
    extract_images: int = 4096
    extract_batch: int = 256
    extract_crop: int = 224
    embed_images: int = 8192
    embed_batch: int = 512
    embed_size: int = 64
    mis_units: int = 2000
    mis_images: int = 4000
    train_steps: int = 20
    train_batch: tuple = (128, 512)  # GoogLeNet, MiniInception
    train_crop: int = 224
    workers: int = 8


QUICK = Sizes(extract_images=48, extract_batch=16, extract_crop=64, embed_images=32, embed_batch=16, embed_size=32,
              mis_units=6, mis_images=400, train_steps=2, train_batch=(4, 16), train_crop=64, workers=0)


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def bench_extraction(rows, device, sizes):
    n, batch, crop = sizes.extract_images, sizes.extract_batch, sizes.extract_crop
    rng = np.random.default_rng(0)
    source = ArraySource("generated", rng.integers(0, 256, (n, crop, crop, 3), dtype=np.uint8), rng.integers(0, 1000, n),
                         [str(c) for c in range(1000)])
    loaded = load_model("googlenet:random")
    loaded.preprocess = Preprocess(crop, crop)
    model = prepare_model(loaded.model, device).eval()
    dataset = TransformedDataset(source, build_transform(loaded.preprocess), (3, crop, crop))

    def bare():
        with torch.inference_mode(), precision(device, amp=False):  # float32 as extraction (no TF32)
            for x, *_ in make_loader(dataset, batch, sizes.workers, device):
                model(to_device(x, device))

    bare()  # warm-up (cuDNN autotuning, worker start)
    t_bare, _ = timed(device, bare)
    rows.append((f"forward loop GoogLeNet fp32, batch {batch}", n / t_bare, "img/s"))
    for amp in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            settings = ExtractSettings(layers=("conv", "softmax"), batch_size=batch, workers=sizes.workers,
                                       device=str(device), amp=amp, dtype="float16")
            t, _ = timed(device, lambda: extract(loaded, source, Path(tmp) / "a.h5", settings))
        rows.append((f"extract GoogLeNet conv+softmax{' AMP' if amp else ''}, batch {batch}", n / t, "img/s"))
        if not amp:
            rows.append(("extract / bare forward (time ratio)", t / t_bare, "x"))


def bench_embeddings(rows, device, sizes):
    from misbench.similarity import build_backend
    from misbench.similarity.deepfeat import DeepFeatBackend
    from misbench.similarity.lpips import LpipsBackend

    n, batch, size = sizes.embed_images, sizes.embed_batch, sizes.embed_size
    x = to_device(torch.rand(batch, 3, size, size), device)
    backends = {f"lpips-{net}": LpipsBackend(net, pretrained=False) for net in ("alex", "vgg", "squeeze")}
    backends["deepfeat:mobilenet_v2"] = DeepFeatBackend("mobilenet_v2", model=torchvision.models.mobilenet_v2())
    backends["pixel"] = build_backend("pixel")
    for name, backend in backends.items():
        backend = prepare_model(backend, device).eval()
        for amp in (False, True):
            with torch.inference_mode(), precision(device, amp):
                backend.embed(x)
                t, _ = timed(device, lambda: [backend.embed(x) for _ in range(n // batch)])
            rows.append((f"embed {name} {size}px{' AMP' if amp else ''}", n / t, "img/s"))


def bench_mis(rows, device, sizes):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _common import generated_folder
    from conftest import write_acts

    from misbench.scoring.run import ScoreSettings, score
    from misbench.similarity.lpips import LpipsBackend

    units, n = sizes.mis_units, sizes.mis_images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = generated_folder(tmp / "images", n, size=64)
        acts = write_acts(tmp / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(n, units))})
        backend = LpipsBackend("alex", pretrained=False)
        settings = ScoreSettings(similarity="lpips-alex", device=str(device), batch_size=sizes.embed_batch,
                                 workers=sizes.workers, n_boot=200)
        t, meta = timed(device, lambda: score(acts, ["l"], settings, tmp / "mis.csv", backend=backend))
        rows.append((f"MIS lpips-alex, {units} units x 20 tasks (incl. embedding {n} images)", units / t, "units/s"))
        rows.append(("  of which embedding", meta["timing"]["embed_s"], "s"))


def masked_training_steps(model, device, batch, size, steps):
    """Seconds for `steps` AMP steps of `model` (plain or DDP-wrapped) with 50 % connection masks enforced."""
    from misbench.pruning import PruneSettings, apply_masks, compute_masks
    from misbench.pruning.training import MaskEnforcer

    net = model.module if hasattr(model, "module") else model
    masks = compute_masks(net, PruneSettings("connection", 0.5), 0.5, ())
    apply_masks(net, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    enforcer = MaskEnforcer(net, masks)
    x = to_device(torch.randn(batch, 3, size, size), device)
    y = to_device(torch.randint(0, 10, (batch,)), device)

    def step():
        opt.zero_grad(set_to_none=True)
        with precision(device, True):
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.cross_entropy(out, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        enforcer.enforce()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            step()
        t, _ = timed(device, lambda: [step() for _ in range(steps)])
    enforcer.remove()
    params = dict(net.named_parameters())
    if not all(bool((params[k][~m.to(device)] == 0).all()) for k, m in masks.items()):
        raise AssertionError("a pruned weight is non-zero after training steps")
    strides = [str(w.message) for w in caught if "Grad strides" in str(w.message)]
    if strides:
        raise AssertionError(f"masked gradients do not have their parameters' layout: {strides[0][:200]}")
    return t


def bench_training(rows, device, sizes):
    from misbench.models.archs import MiniInception

    googlenet = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    for (name, model, size), batch in zip((("GoogLeNet", googlenet, sizes.train_crop),
                                           ("MiniInception", MiniInception(10, width=32), 32)), sizes.train_batch):
        model = prepare_model(model, device).train()
        t = masked_training_steps(model, device, batch, size, sizes.train_steps)
        rows.append((f"train step {name} AMP, masks enforced, batch {batch}", sizes.train_steps * batch / t, "img/s"))


def bench_collectives(rows, device, sizes):
    """misbench's collectives and a DDP step in a one-process group: NCCL on a GPU, gloo on CPU.
    (Several ranks need several GPUs: MISBENCH_DDP=1 in gpu_suite.sh.)"""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from misbench.runtime import distributed

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        if distributed.all_reduce_sum([1.5, 2.0]) != [1.5, 2.0]:
            raise AssertionError("all_reduce_sum changed the values of a one-process group")
        distributed.barrier()
        if not torch.equal(distributed.broadcast_object({"mask": torch.ones(3, dtype=torch.bool)})["mask"],
                           torch.ones(3, dtype=torch.bool)):
            raise AssertionError("broadcast_object changed its object")
        # no aux heads: this step's loss reads only the main output, and DDP wants every parameter used
        googlenet = prepare_model(torchvision.models.googlenet(aux_logits=False, init_weights=False), device).train()
        ids = [device.index or 0] if device.type == "cuda" else None
        batch = sizes.train_batch[0]
        t = masked_training_steps(DistributedDataParallel(googlenet, device_ids=ids), device, batch, sizes.train_crop,
                                  sizes.train_steps)
        rows.append((f"DDP train step GoogLeNet AMP, 1 process ({backend}), batch {batch}",
                     sizes.train_steps * batch / t, "img/s"))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU suite needs one (--device cpu --quick runs its code on CPU)")
        return 1
    device, sizes = torch.device(args.device), QUICK if args.quick else Sizes()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows, failed = [("device", name, "")], False
    for bench in (bench_extraction, bench_embeddings, bench_mis, bench_training, bench_collectives):
        t0 = time.time()
        try:
            bench(rows, device, sizes)
        except Exception as err:  # one failing part should not hide the others
            rows.append((f"{bench.__name__} FAILED", f"{type(err).__name__}: {err}", ""))
            failed = True
        print(f"# {bench.__name__}: {time.time() - t0:.0f} s", flush=True)
    width = max(len(r[0]) for r in rows)
    for label, value, unit in rows:
        text = f"{value:,.1f}" if isinstance(value, float) else str(value)
        print(f"{label:<{width}}  {text:>14} {unit}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
