"""GPU throughput of misbench's hot paths, printed as one table (run by gpu_suite.sh).

Measures: extraction images/s (GoogLeNet, batch 256, all conv units + softmax, vs a bare forward
loop on the same loader), embedding images/s per similarity backend (random trunks: no weights
needed), MIS units/s (embedding engine, FAISS GPU index when available), and a DDP-ready training
step (MiniInception and GoogLeNet with masks enforced, AMP). Data are generated in memory.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misbench.data import ArraySource, TransformedDataset  # noqa: E402
from misbench.extract import ExtractSettings, extract, make_loader  # noqa: E402
from misbench.models import load_model  # noqa: E402
from misbench.preprocess import Preprocess, build_transform  # noqa: E402


def timed(fn, sync=True):
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def bench_extraction(rows, n=4096, batch=256, workers=8):
    rng = np.random.default_rng(0)
    source = ArraySource("generated", rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8), rng.integers(0, 1000, n),
                         [str(c) for c in range(1000)])
    loaded = load_model("googlenet")
    loaded.preprocess = Preprocess(224, 224)
    model = loaded.model.cuda().eval().to(memory_format=torch.channels_last)
    dataset = TransformedDataset(source, build_transform(loaded.preprocess), (3, 224, 224))

    def bare():
        with torch.inference_mode():
            for x, *_ in make_loader(dataset, batch, workers, torch.device("cuda")):
                model(x.cuda(non_blocking=True).contiguous(memory_format=torch.channels_last))

    bare()  # warm-up (cuDNN autotuning, worker start)
    t_bare, _ = timed(bare)
    rows.append(("forward loop GoogLeNet fp32, batch 256", n / t_bare, "img/s"))
    for amp in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            settings = ExtractSettings(layers=("conv", "softmax"), batch_size=batch, workers=workers, device="cuda",
                                       amp=amp, dtype="float16")
            t, _ = timed(lambda: extract(loaded, source, Path(tmp) / "a.h5", settings))
        rows.append((f"extract GoogLeNet conv+softmax{' AMP' if amp else ''}, batch 256", n / t, "img/s"))
        if not amp:
            rows.append(("extract / bare forward (time ratio)", t / t_bare, "x"))


def bench_embeddings(rows, n=8192, size=64, batch=512):
    from misbench.similarity import build_backend
    from misbench.similarity.deepfeat import DeepFeatBackend
    from misbench.similarity.lpips import LpipsBackend

    x = torch.rand(batch, 3, size, size, device="cuda")
    backends = {f"lpips-{net}": LpipsBackend(net, pretrained=False) for net in ("alex", "vgg", "squeeze")}
    backends["deepfeat:mobilenet_v2"] = DeepFeatBackend("mobilenet_v2", model=torchvision.models.mobilenet_v2())
    backends["pixel"] = build_backend("pixel")
    for name, backend in backends.items():
        backend = backend.cuda().eval()
        for amp in (False, True):
            with torch.autocast("cuda", enabled=amp):
                backend.embed(x)
                t, _ = timed(lambda: [backend.embed(x) for _ in range(n // batch)])
            rows.append((f"embed {name} {size}px{' AMP' if amp else ''}", n / t, "img/s"))


def bench_mis(rows, units=2000, n=4000):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _common import generated_folder
    from conftest import write_acts

    from misbench.scoring import ScoreSettings, score
    from misbench.similarity.lpips import LpipsBackend

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = generated_folder(tmp / "images", n, size=64)
        acts = write_acts(tmp / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(n, units))})
        backend = LpipsBackend("alex", pretrained=False)
        settings = ScoreSettings(similarity="lpips-alex", device="cuda", batch_size=512, workers=8, n_boot=200)
        t, meta = timed(lambda: score(acts, ["l"], settings, tmp / "mis.csv", backend=backend))
        rows.append((f"MIS lpips-alex, {units} units x 20 tasks (incl. embedding {n} images)", units / t, "units/s"))
        rows.append(("  of which embedding", meta["timing"]["embed_s"], "s"))


def bench_training(rows, steps=20):
    from misbench.archs import MiniInception
    from misbench.pruning import PruneSettings, apply_masks, compute_masks
    from misbench.training import MaskEnforcer

    for name, model, size, batch in (("GoogLeNet", torchvision.models.googlenet(aux_logits=True, init_weights=False), 224, 128),
                                     ("MiniInception", MiniInception(10, width=32), 32, 512)):
        model = model.cuda().train()
        masks = compute_masks(model, PruneSettings("connection", 0.5), 0.5, ())
        apply_masks(model, masks)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cuda")
        enforcer = MaskEnforcer(model, masks)
        x = torch.randn(batch, 3, size, size, device="cuda")
        y = torch.randint(0, 10, (batch,), device="cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda"):
                out = model(x)
                out = out[0] if isinstance(out, tuple) else out
                loss = torch.nn.functional.cross_entropy(out, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            enforcer.enforce()

        for _ in range(3):
            step()
        t, _ = timed(lambda: [step() for _ in range(steps)])
        rows.append((f"train step {name} AMP, masks enforced, batch {batch}", steps * batch / t, "img/s"))


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU suite needs one")
        return 1
    rows = [("device", torch.cuda.get_device_name(0), "")]
    for bench in (bench_extraction, bench_embeddings, bench_mis, bench_training):
        t0 = time.time()
        try:
            bench(rows)
        except Exception as err:  # one failing part should not hide the others
            rows.append((f"{bench.__name__} FAILED", f"{type(err).__name__}: {err}", ""))
        print(f"# {bench.__name__}: {time.time() - t0:.0f} s", flush=True)
    width = max(len(r[0]) for r in rows)
    for name, value, unit in rows:
        text = f"{value:,.1f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {text:>14} {unit}")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
