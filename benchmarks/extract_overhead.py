"""Extraction (hooks + reductions + HDF5 writes) vs a bare model(x) loop over the same DataLoader.

Target (issue 2): extraction wall time <= 1.15x the bare loop in the same memory layout
(channels-last, which extraction uses). Also printed: the plain NCHW loop most code runs.
GoogLeNet, 512 generated images, CPU, ImageNet preprocessing (resize 256, crop 224),
all conv units + softmax.
"""

import copy
import tempfile
from pathlib import Path

import torch
from _common import Timer, generated_folder

from misbench.datasets.sources import TransformedDataset, load_data
from misbench.runtime.device import make_loader, prepare_model, to_device
from misbench.activations.extract import ExtractSettings, extract
from misbench.models.loading import load_model
from misbench.models.preprocess import build_transform


def main(n=512, batch_size=64, workers=2):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = generated_folder(Path(tmp) / "images", n)
        loaded = load_model("googlenet:random")
        pre = loaded.preprocess
        source = load_data(str(folder))
        dataset = TransformedDataset(source, build_transform(pre), (3, pre.crop, pre.crop))
        cpu = torch.device("cpu")
        plain = copy.deepcopy(loaded.model).eval()
        fast = prepare_model(copy.deepcopy(loaded.model), cpu).eval()
        times = {"plain": [], "bare": [], "extract": []}
        for repeat in range(2):  # interleaved, so drift hits all three
            for name, model, prepare in (("plain", plain, lambda x: x), ("bare", fast, lambda x: to_device(x, cpu))):
                with Timer() as loop, torch.inference_mode():
                    for x, *_ in make_loader(dataset, batch_size, workers, cpu):
                        model(prepare(x))
                times[name].append(loop.seconds)
            settings = ExtractSettings(layers=("conv", "softmax"), batch_size=batch_size, workers=workers, device="cpu",
                                       labels="folder-order")  # generated class folders are not ImageNet WNIDs
            with Timer() as ext:
                extract(loaded, str(folder), Path(tmp) / f"acts{repeat}.h5", settings)
            times["extract"].append(ext.seconds)
        p, b, e = (min(times[k]) for k in ("plain", "bare", "extract"))
        print(f"googlenet, {n} images, batch {batch_size}, workers {workers}, threads {torch.get_num_threads()}")
        print(f"plain NCHW forward loop   : {p:7.2f} s  ({n / p:6.1f} img/s)")
        print(f"channels-last forward loop: {b:7.2f} s  ({n / b:6.1f} img/s)")
        print(f"misbench extract          : {e:7.2f} s  ({n / e:6.1f} img/s)")
        print(f"ratio extract/bare: {e / b:.3f}  (target <= 1.15); extract/plain: {e / p:.3f}")


if __name__ == "__main__":
    main()
