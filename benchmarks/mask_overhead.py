"""One training epoch with pruning masks enforced vs the same epoch without pruning.

Target (issue 4): masked epoch <= 1.10x the unmasked epoch. MiniInception (width 32),
4096 generated 32 px images, batch 64, SGD with momentum and weight decay, CPU.
"""

import numpy as np
import torch
from _common import Timer

from misbench.models.archs import MiniInception
from misbench.datasets.sources import ArraySource
from misbench.models.preprocess import Preprocess
from misbench.pruning import PruneSettings, apply_masks, compute_masks
from misbench.pruning.training import Trainer, TrainSettings


def epoch_time(masks, source, pre):
    torch.manual_seed(0)
    model = MiniInception(10, width=32)
    if masks:
        apply_masks(model, masks)
    trainer = Trainer(model, masks, TrainSettings(epochs=1, batch_size=64, device="cpu"), pre, source, None)
    with Timer() as t:
        trainer.train_epoch()
    return t.seconds


def main(n=4096):
    rng = np.random.default_rng(0)
    source = ArraySource("generated", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                         [str(c) for c in range(10)])
    pre = Preprocess(32, 32, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    masks = compute_masks(MiniInception(10, width=32), PruneSettings("unstructured", 0.5), 0.5, ())
    plain, masked = [], []
    for _ in range(2):
        plain.append(epoch_time({}, source, pre))
        masked.append(epoch_time(masks, source, pre))
    p, m = min(plain), min(masked)
    print(f"MiniInception(width 32), {n} images, CPU threads {torch.get_num_threads()}")
    print(f"epoch without pruning : {p:6.2f} s")
    print(f"epoch with masks      : {m:6.2f} s")
    print(f"ratio masked/unmasked : {m / p:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
