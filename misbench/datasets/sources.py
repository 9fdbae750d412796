"""Load any DATA string (DESIGN §3): ImageFolder directories and named datasets."""

__all__ = [
    "ImageSource", "FolderSource", "ArraySource", "TransformedDataset", "BadImageError",
    "load_data", "fashion_mnist_dirs", "FASHION_MNIST_CLASSES", "to_rgb", "FLOAT_RANGE", "DIGEST_CHARS",
    "data_folders",
]

import gzip
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import MisbenchError
from ..runtime.paths import misbench_home
from .folders import IMAGE_EXTENSIONS, UNLABELLED, scan_folder
from .labels import LABEL_MODES, LabelMap, folder_labels

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class BadImageError(MisbenchError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path


DIGEST_CHARS = 32  # an image's content identity: the first 128 bits of its sha256, hex (activation files, caches)
FLOAT_RANGE = (0.0, 1.0)  # what a floating-point image's values mean: 0 black, 1 white (values outside are clipped)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. PIL's own convert() clips to 0..255 without scaling, so two grayscale
    kinds are scaled here first: 16-bit integers (modes I;16*, I) by 255/65535 (else almost every pixel is
    white) and 32-bit floats (mode F, e.g. float TIFFs) from FLOAT_RANGE, i.e. [0, 1], to 0..255 (else
    almost every pixel is black)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            lo, hi = FLOAT_RANGE
            values = np.nan_to_num((values - lo) * (255.0 / (hi - lo)), nan=0.0)
        else:
            values = values * (255.0 / 65535.0)
        values = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(values).convert("RGB")
    return img.convert("RGB")


class ImageSource:
    """Indexable images with labels; `image(i)` is an RGB PIL image."""

    spec: str
    root: str
    classes: list

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def path(self, i: int) -> str:
        return ""

    def digest(self, i: int) -> str:
        """sha256 of the image's stored bytes (hex): its identity for embedding caches."""
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """Every image's label, in dataset order."""
        held = getattr(self, "_labels", None)
        return np.asarray(held) if held is not None else np.array([self.label(i) for i in range(len(self))])


class FolderSource(ImageSource):
    """An ImageFolder; labels are the model's class indices (see labels.py), `classes` the model's names.

    Without `num_classes` (no model: images only) sorted folder k is class k.
    """

    def __init__(self, spec: str, root: Path, num_classes: int | None = None, labels: str = "auto",
                 categories: list | None = None):
        self.spec, self.root = spec, str(root)
        try:
            self.folders, samples = scan_folder(root)
        except OSError as err:
            raise MisbenchError(f"cannot list {root}: {err.strerror or err}. Expected one sub-folder per class "
                                "(or a folder of images, unlabelled)") from None
        if not samples:
            raise MisbenchError(f"{root} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}: expected one "
                                "sub-folder of images per class, or a folder of images (unlabelled)")
        self._paths = [path for path, _ in samples]
        if not self.folders:  # a flat folder: images without classes
            log.info("%s: %d images and no class folders: unlabelled (label %d)", root, len(samples), UNLABELLED)
            self.classes = list(categories) if categories and len(categories) == num_classes else \
                [str(c) for c in range(num_classes or 0)]
            self.label_map = LabelMap((), tuple(self.classes), "unlabelled")
            self._labels = np.full(len(samples), UNLABELLED, dtype=np.int64)
            return
        self.label_map = folder_labels(self.folders, num_classes, labels, str(root), categories)
        self.classes = list(self.label_map.names)
        index = np.asarray(self.label_map.indices, dtype=np.int64)
        self._labels = index[np.array([c for _, c in samples], dtype=np.int64)]

    def __len__(self):
        return len(self._paths)

    def image(self, i):
        path = os.path.join(self.root, self._paths[i])
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except Exception as err:  # PIL raises many types for truncated or foreign files
            raise BadImageError(path, f"{type(err).__name__}: {err}") from None

    def label(self, i):
        return int(self._labels[i])

    def path(self, i):
        return self._paths[i]

    def digest(self, i):
        path = os.path.join(self.root, self._paths[i])
        try:
            with open(path, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as err:
            raise BadImageError(path, f"{type(err).__name__}: {err}") from None


class ArraySource(ImageSource):
    """Images held in memory as uint8 [N, H, W] (grayscale) or [N, H, W, 3]."""

    def __init__(self, spec: str, images: np.ndarray, labels: np.ndarray, classes: list):
        self.spec, self.root, self.classes = spec, "", list(classes)
        self._images, self._labels = images, labels.astype(np.int64)

    def __len__(self):
        return len(self._images)

    def image(self, i):
        return Image.fromarray(self._images[i]).convert("RGB")

    def digest(self, i):
        image = np.ascontiguousarray(self._images[i])
        return hashlib.sha256(f"{image.dtype}{image.shape}".encode() + image.tobytes()).hexdigest()

    def label(self, i):
        return int(self._labels[i])


def derived_seed(*entropy: int) -> int:
    """A 63-bit seed (room to add epochs) that depends on the integers given and nothing else."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0]) >> 1


class TransformedDataset(torch.utils.data.Dataset):
    """(tensor, label, index, ok): a bad image yields ok=False instead of killing the loader. With
    `digests`, a fifth element: the first 128 bits (hex) of the sha256 of the image's stored bytes, hashed in
    the loader's workers ("" for a bad image).

    With `seed` (a tuple of ints), random transforms draw from a generator seeded by (seed, epoch,
    image index), so augmentations do not depend on the number of loader workers or ranks; set
    `epoch` before each epoch.
    """

    def __init__(self, source: ImageSource, transform, shape: tuple, start: int = 0, stop: int | None = None,
                 seed: tuple | None = None, digests: bool = False):
        self.source, self.transform, self.shape, self.digests = source, transform, shape, digests
        self.start, self.stop = start, len(source) if stop is None else stop
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return max(0, self.stop - self.start)

    def _transform(self, image, i):
        if self.seed is None:
            return self.transform(image)
        # the CPU generator alone (torch.manual_seed would also reseed GPUs, at 100 us per image),
        # restored after: in the main process the training loop's dropout draws from it
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(derived_seed(*self.seed, self.epoch, i))
        try:
            return self.transform(image)
        finally:
            generator.set_state(state)

    def __getitem__(self, j):
        i = self.start + j
        try:
            x, ok = self._transform(self.source.image(i), i), True
        except BadImageError:
            x, ok = torch.zeros(self.shape), False
        if not self.digests:
            return x, self.source.label(i), i, ok
        return x, self.source.label(i), i, ok, self.source.digest(i)[:DIGEST_CHARS] if ok else ""


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dirs() -> list[Path]:
    dirs = [Path(os.environ["MISBENCH_FASHION_MNIST"])] if os.environ.get("MISBENCH_FASHION_MNIST") else []
    return dirs + [DEBIAN_FASHION_MNIST, misbench_home() / "datasets" / "fashion-mnist"]


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    return None


def _fashion_mnist(split: str, spec: str) -> ArraySource:
    prefix = {"train": "train", "test": "t10k"}[split]
    for d in fashion_mnist_dirs():
        images, labels = _find_idx(d, f"{prefix}-images-idx3-ubyte"), _find_idx(d, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            log.info("Fashion-MNIST %s from %s", split, d)
            return ArraySource(spec, _read_idx(images), _read_idx(labels), FASHION_MNIST_CLASSES)
    try:
        # torchvision loads only where a model or transform needs it: `import misbench` stays light
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(misbench_home() / "datasets" / "torchvision"), train=split == "train", download=True)
    except Exception as err:
        raise MisbenchError(
            f"Fashion-MNIST not found in {', '.join(map(str, fashion_mnist_dirs()))} and the download failed "
            f"({type(err).__name__}). Install Debian's package (apt-get install dataset-fashion-mnist) or "
            f"stage the idx files with `misbench assets stage fashion-mnist --from DIR`."
        ) from None
    return ArraySource(spec, ds.data.numpy(), ds.targets.numpy(), FASHION_MNIST_CLASSES)


def _digits(spec: str) -> ArraySource:
    try:
        # optional: scikit-learn is the `toy` extra, needed for this data set only
        from sklearn.datasets import load_digits
    except ImportError:
        raise MisbenchError("DATA 'digits' is scikit-learn's bundled digits set, and scikit-learn is not installed: "
                            "pip install 'misbench[toy]' (or use an ImageFolder directory or fashion-mnist)") from None

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return ArraySource(spec, images, bunch.target, [str(c) for c in range(10)])


NAMED_DATASETS = ("fashion-mnist:train", "fashion-mnist:test", "digits")


def data_folders(data: dict) -> dict:
    """{option: (folder, image extensions)} of DATA specs or sources (runtime.outputs.writing's `folders`): no
    output may replace or add an image inside a folder a command reads."""
    return {name: (getattr(spec, "root", spec), IMAGE_EXTENSIONS) for name, spec in data.items()
            if isinstance(spec, (str, ImageSource))}


def load_data(spec: str, num_classes: int | None = None, labels: str = "auto",
              categories: list | None = None) -> ImageSource:
    """DATA: an ImageFolder directory, `fashion-mnist:train|test` or `digits`.

    `num_classes` (the model's) and `labels` decide how class folders map to class indices (labels.py).
    """
    if labels not in LABEL_MODES:
        raise MisbenchError(f"--labels {labels!r}: expected one of {', '.join(LABEL_MODES)}")
    if spec == "digits":
        return _digits(spec)
    if spec.startswith("fashion-mnist"):
        split = spec.partition(":")[2] or "train"
        if split not in ("train", "test"):
            raise MisbenchError(f"unknown Fashion-MNIST split {split!r}: expected fashion-mnist:train or fashion-mnist:test")
        return _fashion_mnist(split, spec)
    path = Path(spec)
    if not path.is_dir():
        raise MisbenchError(
            f"data {spec!r} is neither an existing directory (ImageFolder layout) nor one of {', '.join(NAMED_DATASETS)}"
        )
    return FolderSource(spec, path.resolve(), num_classes, labels, categories)
