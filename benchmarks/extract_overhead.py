"""Extraction (hooks + reductions + HDF5 writes) vs a bare model(x) loop over the same DataLoader.

Target (issue 2): extraction wall time <= 1.15x the bare loop. GoogLeNet, 512 generated
images, CPU, default ImageNet preprocessing (resize 256, crop 224), all conv units + softmax.
"""

import tempfile
from pathlib import Path

import torch
from _common import Timer, generated_folder

from misbench.data import TransformedDataset, load_data
from misbench.extract import ExtractSettings, extract, make_loader
from misbench.models import load_model
from misbench.preprocess import build_transform


def main(n=512, batch_size=64, workers=2):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = generated_folder(Path(tmp) / "images", n)
        loaded = load_model("googlenet")
        pre = loaded.preprocess
        source = load_data(str(folder))
        dataset = TransformedDataset(source, build_transform(pre), (3, pre.crop, pre.crop))
        model = loaded.model.eval()
        bare_times, extract_times = [], []
        for repeat in range(2):  # interleaved, so drift hits both
            with Timer() as bare, torch.inference_mode():
                for x, *_ in make_loader(dataset, batch_size, workers, torch.device("cpu")):
                    model(x)
            bare_times.append(bare.seconds)
            settings = ExtractSettings(layers=("conv", "softmax"), batch_size=batch_size, workers=workers, device="cpu")
            with Timer() as ext:
                extract(loaded, str(folder), Path(tmp) / f"acts{repeat}.h5", settings)
            extract_times.append(ext.seconds)
        b, e = min(bare_times), min(extract_times)
        print(f"googlenet, {n} images, batch {batch_size}, workers {workers}, threads {torch.get_num_threads()}")
        print(f"bare forward loop : {b:7.2f} s  ({n / b:6.1f} img/s)")
        print(f"misbench extract  : {e:7.2f} s  ({n / e:6.1f} img/s)")
        print(f"ratio extract/bare: {e / b:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
