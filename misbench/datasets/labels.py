"""Which model class each ImageFolder class folder means (DESIGN §3 DATA).

A model with 1000 outputs is taken as ImageNet-1k in torchvision's category order, which is the order
of the sorted WordNet ids (WNIDs); data/imagenet_wnids.txt ships them. Class folders named by WNIDs
(a whole ImageNet split, or a subset such as Imagenette) map to those indices whatever subset they
are; any other folder names cannot be matched to ImageNet's classes and need the user's word
(`--labels folder-order`: sorted folder k is class k, torchvision ImageFolder's convention).
"""

__all__ = ["LABEL_MODES", "labels_setting", "IMAGENET_CLASSES", "LabelMap", "imagenet_wnids", "imagenet_categories", "folder_labels"]

import dataclasses
import functools
import logging
import re
from importlib import resources

from ..errors import MisbenchError
from ..runtime.schema import setting

log = logging.getLogger(__name__)

LABEL_MODES = ("auto", "folder-order")
IMAGENET_CLASSES = 1000
WNID = re.compile(r"n\d{8}")


def labels_setting():
    """The `labels` field of every settings dataclass that reads class folders (the study's [data] labels)."""
    return setting("auto", choices=LABEL_MODES, config=False,
                   help="How ImageFolder class folders map to the model's classes. auto: WNID folders (n01440764, "
                        "...) to a 1000-class model's ImageNet indices, else sorted folder k = class k (an error for "
                        "a 1000-class model); folder-order: sorted folder k = class k.")


@dataclasses.dataclass(frozen=True)
class LabelMap:
    indices: tuple      # folder k (sorted) -> model class index
    names: tuple        # model class index -> name
    mapping: str        # "wnid", "folder-order" or "unlabelled": how the folders were matched
    warning: str = ""   # folder-order with fewer folders than the model's classes: the mapping is a guess


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple:
    """The 1000 ImageNet-1k WNIDs; position = torchvision's class index."""
    text = (resources.files("misbench.configs") / "imagenet_wnids.txt").read_text()
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(wnids) == IMAGENET_CLASSES and list(wnids) == sorted(wnids), "data/imagenet_wnids.txt is damaged"
    return wnids


def imagenet_categories() -> list:
    """torchvision's ImageNet-1k category names (the weights' metadata), in class-index order."""
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    return list(torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"])


def _cut(items, n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def folder_labels(classes: list, num_classes: int | None, mode: str = "auto", root: str = "",
                  categories: list | None = None) -> LabelMap:
    """Match sorted class folders to the classes of a model with `num_classes` outputs (None: no model)."""
    if mode not in LABEL_MODES:
        raise MisbenchError(f"--labels {mode!r}: expected one of {', '.join(LABEL_MODES)}")
    classes = list(classes)
    imagenet = num_classes == IMAGENET_CLASSES
    if mode == "auto" and imagenet:
        index = {w: k for k, w in enumerate(imagenet_wnids())}
        unmatched = [c for c in classes if c not in index]
        if unmatched:
            raise MisbenchError(
                f"{root}: class folders {_cut(unmatched)} are not ImageNet WNIDs (n01440764, ...), so they cannot be "
                f"matched to the model's 1000 ImageNet classes. Name the folders by WNID, or pass --labels "
                f"folder-order to take sorted folder k as class k (only right for a model trained that way)")
        names = list(categories) if categories and len(categories) == IMAGENET_CLASSES else imagenet_categories()
        log.info("%s: %d WNID class folders matched to ImageNet class indices", root, len(classes))
        return LabelMap(tuple(index[c] for c in classes), tuple(names), "wnid")
    if num_classes is not None and len(classes) > num_classes:
        raise MisbenchError(
            f"{root} has {len(classes)} class folders but the model has {num_classes} classes: folder k cannot "
            f"be class k. Use the data the model was trained on (ImageNet models: WNID folders)")
    names = list(classes)
    if num_classes is not None and categories and len(categories) == num_classes:
        names = list(categories)
    elif num_classes is not None:
        names += [str(c) for c in range(len(classes), num_classes)]
    warning = ""
    if num_classes is not None and len(classes) != num_classes:
        warning = (f"{root}: {len(classes)} class folders for a model with {num_classes} classes: folder-order takes "
                   f"sorted folder k as class k (folder {classes[0]!r} as class 0 {names[0]!r}), which is right only "
                   "if the model was trained on these folders; accuracies and class reports mean nothing otherwise")
        log.warning("%s", warning)
    return LabelMap(tuple(range(len(classes))), tuple(names), "folder-order", warning)
