import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

# two pytest-xdist workers on two cores: one thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def make_image_folder(root, classes=3, per_class=8, size=40, seed=0):
    """ImageFolder of seeded random images: each class has its own dominant colour."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            noise = rng.integers(-60, 60, (size, size + (i % 3) * 4, 3))
            img = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return root


def write_acts(path, folder, layers: dict, labels=None, logits=None):
    """A complete activation file (schema 1) for the images of an ImageFolder, with given activations."""
    from misbench.datasets.sources import FolderSource
    from misbench.activations.store import SCHEMA, ActivationWriter

    source = FolderSource(str(folder), folder.resolve())
    n = len(source)
    labels = np.array([source.label(i) for i in range(n)]) if labels is None else labels
    logits = np.zeros((n, max(len(source.classes), 2)), np.float32) if logits is None else logits
    attrs = {"schema": SCHEMA, "schema_version": 1, "misbench_version": "test", "model": "test", "checkpoint_sha256": "",
             "arch": "test", "data": str(folder), "data_root": str(folder.resolve()), "num_classes": logits.shape[1],
             "class_names": json.dumps(source.classes), "transform": "{}", "reduction": "mean", "created_utc": "",
             "layer_names": json.dumps(list(layers))}
    writer = ActivationWriter(path, attrs)
    writer.append(np.arange(n), [source.path(i) for i in range(n)], labels, logits,
                  {k: np.asarray(v, np.float32) for k, v in layers.items()},
                  {k: {"module": k, "kind": "linear", "n_units": np.shape(v)[1], "reduction": "mean"} for k, v in layers.items()},
                  np.float32, next_index=n)
    writer.finish()
    writer.close()
    return path


def make_checkpoint(path, seed=0):
    """A misbench checkpoint of a small random mini_inception (16-pixel preprocessing)."""
    from misbench.models.archs import build_arch
    from misbench.models.checkpoint import build_checkpoint, save_checkpoint
    from misbench.models.loading import LoadedModel
    from misbench.models.preprocess import Preprocess

    torch.manual_seed(seed)
    model = build_arch("mini_inception", 3, {"width": 8})
    loaded = LoadedModel(model, "mini_inception", "mini_inception", {"width": 8}, 3,
                         Preprocess(resize=16, crop=16, mean=(0.5,) * 3, std=(0.25,) * 3))
    save_checkpoint(build_checkpoint(loaded, model, {}, None, {"history": []}, {"model": "test", "sha256": ""}), path)
    return path


# The tiny study the study tests start from: a checkpoint pruned once, retrained, two layers scored by pixels at
# 16 pixels with few tasks. Tests change it with write_study's sections.
TINY_STUDY = {
    "study": {"name": "tiny"},
    "pruning": {"methods": ["structured"], "rates": [0.5], "control": False},
    "retrain": {"epochs": 1, "batch_size": 8},
    "extract": {"layers": ["conv1.bn", "softmax"], "batch_size": 4},
    "score": {"similarity": "pixel", "image_size": 16, "n_boot": 20, "tasks": 3, "explanations": 2},
}
# mini_inception built from its architecture (3 classes, width 8, 16-pixel preprocessing) instead of a checkpoint
TINY_ARCH = {"arch": "mini_inception", "num_classes": 3, "arch_kwargs": {"width": 8},
             "preprocess": {"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.25] * 3}}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string (paths too)


def study_config(sections: dict, base=None) -> dict:
    """TINY_STUDY (or `base`) with `sections` merged in: a section's keys replace the base's, a key or a whole
    section given as None is removed."""
    merged = {name: dict(keys) for name, keys in (TINY_STUDY if base is None else base).items()}
    for name, keys in sections.items():
        if keys is None:
            merged.pop(name, None)
            continue
        merged[name] = {k: v for k, v in {**merged.get(name, {}), **keys}.items() if v is not None}
    return merged


def write_study(path, base=None, **sections):
    """The study config `study_config(sections, base)` written as TOML to `path`; returns `path`."""
    lines = []
    for name, keys in study_config(sections, base).items():
        lines += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in keys.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def property_folder(tmp_path_factory):
    """450 small images with known properties: brightness, hue, stripe frequency; plus the values."""
    import colorsys

    root = tmp_path_factory.mktemp("props") / "images"
    rng = np.random.default_rng(1)
    n = 450
    props = {"brightness": rng.random(n), "hue": rng.random(n), "stripes": rng.random(n)}
    for i in range(n):
        d = root / f"class_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        r, g, b = colorsys.hsv_to_rgb(0.5 * props["hue"][i], 0.5, 0.1 + 0.85 * props["brightness"][i])
        x = np.arange(32)
        freq = 1 + 7 * props["stripes"][i]
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * x / 32)[None, :, None]
        img = np.ones((32, 32, 3)) * np.array([r, g, b]) * (0.75 + 0.25 * stripes)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(d / f"img_{i:04d}.png")
    from misbench.datasets.sources import FolderSource

    source = FolderSource(str(root), root)
    order = [int(source.path(i).split("_")[-1].split(".")[0]) for i in range(len(source))]
    return root, {k: v[order] for k, v in props.items()}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm (tests/slurm_cluster.py) for the session; SLURM_CONF points the client commands
    (and, through sbatch, the jobs) at it. Skips where scripts/ensure-slurm.sh could not install Slurm."""
    from slurm_cluster import Cluster, missing_commands

    missing = missing_commands()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): run scripts/ensure-slurm.sh as root")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def trust_standins(monkeypatch, torch_home) -> None:
    """Point TORCH_HOME at `torch_home` and take the random stand-ins staged in its hub cache under torchvision's
    file names as already checked by this process (loading._VERIFIED, the memo of files whose sha256 matched
    their name). Only a test can do this, in its own process: misbench has no switch that skips the check."""
    from pathlib import Path

    from misbench.models import loading
    from misbench.runtime.fileio import sha256_file

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for path in sorted(hub.iterdir()):
        stat = path.stat()
        monkeypatch.setitem(loading._VERIFIED, (str(path), stat.st_size, stat.st_mtime_ns), sha256_file(path))
