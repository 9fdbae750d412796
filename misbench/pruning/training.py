"""Retraining with the seed paper's recipe, masks enforced after every optimizer step."""

__all__ = ["TrainSettings", "MaskEnforcer", "Trainer", "train_transform", "data_subsets", "subsets_record"]

import contextlib
import dataclasses
import logging
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..datasets.labels import labels_setting
from ..datasets.sources import ImageSource, TransformedDataset, derived_seed
from ..datasets.subset import first_images
from ..errors import MisbenchError
from ..models.preprocess import Preprocess, build_transform
from ..runtime import distributed
from ..runtime.device import (batch_size_setting, describe, device_setting, make_loader, precision, prepare_model,
                              resolve_device, to_device, workers_setting)
from ..runtime.fileio import option_label
from ..runtime.schema import setting, validate

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    epochs: int = setting(0, low=0, help="Retraining epochs after each pruning step (0: no retraining).")
    optimizer: str = setting("sgd", choices=OPTIMIZERS, help="sgd or adam (the seed's recipe: sgd).")
    # None: 0.01 for SGD, 0.001 for Adam (the seed's)
    lr: float | None = setting(None, low=0, help="Default 0.01 (SGD) or 0.001 (Adam).")
    momentum: float = setting(0.9, low=0, help="SGD momentum.")
    weight_decay: float = setting(1e-4, low=0, help="L2 weight decay.")
    gamma: float = setting(0.9, low=0, help="ExponentialLR factor per epoch.")  # stepped per epoch
    aux_weight: float = setting(0.3, low=0, cli=False, config=False)
    batch_size: int = batch_size_setting()
    seed: int = setting(0, low=0, config=False, help="Seed of masks, shuffling and augmentation.")
    train_limit: int | None = setting(None, low=1, help="Only the first N training images.")
    val_limit: int | None = setting(None, low=1, help="Only the first N validation images.")
    # random flips (and resized crops at ImageNet size)
    augment: bool = setting(True, flag="--no-augment", config=False, help="No random flips/crops in training.")
    labels: str = labels_setting()  # how class folders map to the model's classes (labels.py)
    # how, not what
    workers: int | None = workers_setting()
    device: str = device_setting()
    amp: bool = setting(True, flag="--no-amp", config=False,  # used on CUDA only
                        help="Train in float32 on CUDA too (CPU training is always float32).")

    def __post_init__(self):
        validate(self)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise MisbenchError(f"{option_label('lr')} must be a positive finite number, got {self.lr}")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.01 if self.optimizer == "sgd" else 0.001)

    def record(self) -> dict:
        return {"optimizer": self.optimizer, "lr": self.resolved_lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "scheduler": "ExponentialLR", "gamma": self.gamma,
                "epochs": self.epochs, "batch_size": self.batch_size, "aux_weight": self.aux_weight, "seed": self.seed,
                "train_limit": self.train_limit, "val_limit": self.val_limit, "augment": self.augment,
                "labels": self.labels}


def data_subsets(settings: TrainSettings, train_source, val_source) -> dict:
    """{"train", "val"}: the Subset (first_images) each limit takes of its source (None without a source)."""
    return {"train": None if train_source is None else first_images(train_source, settings.train_limit, "train_limit"),
            "val": None if val_source is None else first_images(val_source, settings.val_limit, "val_limit")}


def subsets_record(subsets: dict) -> dict:
    """The training record's `subsets` entry: each limited split's Subset.record() (empty without limits)."""
    found = {split: subset.record() for split, subset in subsets.items() if subset is not None and subset.record()}
    return {"subsets": found} if found else {}


def train_transform(pre: Preprocess, augment: bool = True):
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    from torchvision import transforms as T

    if not augment:
        return build_transform(pre)
    if pre.crop >= 128:  # ImageNet-sized: the usual random-resized-crop recipe
        return T.Compose([T.RandomResizedCrop(pre.crop, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(pre.mean, pre.std)])
    return T.Compose([T.Resize(pre.resize, antialias=True), T.CenterCrop(pre.crop), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def _masked_like(param, grad, mask):
    """grad * mask with exactly the parameter's strides: DDP's buckets expect them, and for 1x1
    convolutions in channels-last a plain product differs in the strides of size-1 dimensions."""
    return torch.mul(grad, mask, out=torch.empty_like(param, dtype=grad.dtype))


class MaskEnforcer:
    """Pruned entries stay exactly zero: gradients masked (clean momentum) and weights re-zeroed after each step."""

    def __init__(self, model: nn.Module, masks: dict):
        params = dict(model.named_parameters())
        self.pairs = [(params[n], m.to(params[n].device)) for n, m in masks.items()]
        self._handles = [p.register_hook(lambda g, p=p, m=m: _masked_like(p, g, m)) for p, m in self.pairs]

    @torch.no_grad()
    def enforce(self):
        for p, m in self.pairs:
            p.mul_(m)

    def remove(self):
        for h in self._handles:
            h.remove()


def _logits_and_loss(model, x, y, aux_weight):
    out = model(x)
    if isinstance(out, tuple) and hasattr(out, "aux_logits1"):  # torchvision GoogLeNet in training mode
        loss = nn.functional.cross_entropy(out.logits, y)
        for aux in (out.aux_logits1, out.aux_logits2):
            if aux is not None:
                loss = loss + aux_weight * nn.functional.cross_entropy(aux, y)
        return out.logits, loss
    if isinstance(out, tuple):  # InceptionOutputs
        return out[0], nn.functional.cross_entropy(out[0], y) + aux_weight * nn.functional.cross_entropy(out[1], y)
    return out, nn.functional.cross_entropy(out, y)


class Trainer:
    """One model, its optimizer, scheduler and data order; state_dict()/load_state_dict() for exact resume."""

    def __init__(self, model: nn.Module, masks: dict, settings: TrainSettings, pre: Preprocess,
                 train_source: ImageSource | None, val_source: ImageSource | None, stream: int = 0,
                 subsets: dict | None = None):
        """`stream` (the pruning step) gives each retraining its own data order and augmentations. `subsets`:
        data_subsets(...) of the sources, taken once for all steps (default: taken here)."""
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.rank, self.size = distributed.world()
        if settings.batch_size % self.size:
            raise MisbenchError(f"--batch-size {settings.batch_size} is the global batch: it must be divisible by "
                                f"the {self.size} processes")
        self.model = prepare_model(model, self.device)
        self.masks = masks
        self.epoch = 0
        self.ddp = None
        if self.size > 1:
            ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        params = [p for p in model.parameters() if p.requires_grad]
        if settings.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=settings.resolved_lr, momentum=settings.momentum,
                                             weight_decay=settings.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=settings.resolved_lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=settings.gamma)
        self.stream_seed = derived_seed(settings.seed, stream)
        self.generator = torch.Generator().manual_seed(self.stream_seed)
        self.use_amp = settings.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if self.rank == 0:
            log.info("training on %s%s", describe(self.device, settings.workers, self.use_amp),
                     f", DDP over {self.size} processes" if self.size > 1 else "")
        subsets = data_subsets(settings, train_source, val_source) if subsets is None else subsets
        self.train_set = None
        if train_source is not None:
            n_train = subsets["train"].images
            self.train_set = TransformedDataset(train_source, train_transform(pre, settings.augment),
                                                (3, pre.crop, pre.crop), 0, n_train, seed=(settings.seed, stream))
        self.val_set = None
        if val_source is not None:
            n_val = subsets["val"].images
            self.val_set = TransformedDataset(val_source, build_transform(pre), (3, pre.crop, pre.crop), 0, n_val)

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "generator": self.generator.get_state(), "cpu_rng": torch.get_rng_state(), "epoch": self.epoch}
        if self.device.type == "cuda":  # dropout draws on the GPU's generator
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.use_amp:  # the loss scale decides which early steps are skipped
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state.get("grad_scaler") and self.use_amp:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.epoch = int(state.get("epoch", 0))

    def train_epoch(self, progress=None) -> float:
        enforcer = MaskEnforcer(self.model, self.masks)
        self.model.train()
        net = self.ddp or self.model
        self.train_set.epoch = self.epoch
        if self.size > 1:  # each rank a disjoint, seeded share of every global batch
            sampler = torch.utils.data.DistributedSampler(self.train_set, self.size, self.rank, shuffle=True,
                                                          seed=self.stream_seed, drop_last=True)
            sampler.set_epoch(self.epoch)
            loader = make_loader(self.train_set, self.settings.batch_size // self.size, self.settings.workers,
                                 self.device, sampler=sampler, drop_last=len(sampler) > self.settings.batch_size // self.size)
        else:
            loader = make_loader(self.train_set, self.settings.batch_size, self.settings.workers, self.device,
                                 shuffle=True, generator=self.generator,
                                 drop_last=len(self.train_set) > self.settings.batch_size)
        total, count = 0.0, 0
        # AMP: autocast around the forward pass only; float32: no TF32 in the forward or backward pass
        whole_step = contextlib.nullcontext() if self.use_amp else precision(self.device, amp=False)
        forward = (lambda: precision(self.device, amp=True)) if self.use_amp else contextlib.nullcontext
        try:
            with whole_step:
                for k, (x, y, _i, ok) in enumerate(loader):
                    if not ok.all():
                        raise MisbenchError("unreadable training images; fix the data (extract reports paths)")
                    x, y = to_device(x, self.device), to_device(y, self.device)
                    self.optimizer.zero_grad(set_to_none=True)
                    with forward():
                        _, loss = _logits_and_loss(net, x, y, self.settings.aux_weight)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    enforcer.enforce()
                    value = loss.item()
                    if not math.isfinite(value):
                        raise MisbenchError("training diverged (loss is not finite); lower --lr")
                    total += value * len(y)
                    count += len(y)
                    if progress:
                        progress(k + 1, len(loader))
        finally:
            enforcer.remove()
        self.scheduler.step()
        self.epoch += 1
        total, count = distributed.all_reduce_sum([total, count])
        return total / max(count, 1)

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.val_set is None:
            return None
        self.model.eval()
        correct = n = 0
        start, stop = distributed.block(len(self.val_set), self.rank, self.size)
        share = torch.utils.data.Subset(self.val_set, range(start, stop))
        with precision(self.device, amp=False):  # the accuracy `misbench eval` would report
            for x, y, _i, _ok in make_loader(share, self.settings.batch_size, self.settings.workers, self.device):
                out = self.model(to_device(x, self.device))
                out = out[0] if isinstance(out, tuple) else out
                correct += (out.argmax(1).cpu() == y).sum().item()
                n += len(y)
        correct, n = distributed.all_reduce_sum([correct, n])
        return correct / max(n, 1)
