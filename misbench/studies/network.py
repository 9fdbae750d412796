"""A study's [model] network: its spec loaded, or its arch built randomly initialised (the base before training)."""

__all__ = ["study_network"]

from ..models.archs import build_arch
from ..models.loading import LoadedModel, load_model
from ..models.preprocess import IMAGENET_PREPROCESS, Preprocess


def study_network(m: dict, skeleton: bool = False) -> LoadedModel:
    """The network of [model] section `m` (torch's generator as the caller left it). `skeleton`: a torchvision or
    family name's architecture randomly initialised instead of its weights (layer names and widths, no file)."""
    if m["spec"]:
        spec = m["spec"]
        if skeleton and ":" in spec and "/" not in spec and not spec.endswith((".pt", ".pth", ".ckpt")):
            spec = spec.rpartition(":")[0] + ":random"
        return load_model(spec, num_classes=m["num_classes"])
    model = build_arch(m["arch"], m["num_classes"], m["arch_kwargs"])
    pre = Preprocess.from_dict(m["preprocess"]) if m["preprocess"] else IMAGENET_PREPROCESS
    return LoadedModel(model, m["arch"], m["arch"], dict(m["arch_kwargs"]), m["num_classes"], pre)
