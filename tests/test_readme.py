"""The README's usage block, run line by line on a small model and generated images."""

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import make_image_folder, trust_standins
from misbench.models.archs import build_arch
from misbench.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("misbench ")]


def test_readme_usage_block_runs(tmp_path, monkeypatch):
    commands = readme_commands()
    assert len(commands) == 7
    images = make_image_folder(tmp_path / "images", classes=3, per_class=140, size=16)
    torch.manual_seed(0)
    model = tmp_path / "mini.pt"
    torch.save(build_arch("mini_inception", 3, {"width": 8}).state_dict(), model)
    # lpips-alex needs AlexNet's ImageNet weights: a random stand-in in this test's own hub cache
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), hub / "alexnet-owt-7be5be79.pth")
    trust_standins(monkeypatch, tmp_path / "torch")  # the stand-in is not the file its name promises
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")
    variables = {"M": f"{model} --arch mini_inception --num-classes 3 --arch-kwargs '{{\"width\": 8}}'",
                 "TRAIN": str(images), "VAL": str(images)}
    runner = CliRunner()
    for line in commands:
        line = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line).replace("--epochs 50", "--epochs 1")
        if line.startswith("misbench extract") or line.startswith("misbench prune"):
            line += " --resize 16 --crop 16"
        args = shlex.split(line)[1:]
        result = runner.invoke(cli, args)
        if "--dry-run" in args:  # the full study's plan, its size, and what is missing here (ImageNet, GoogLeNet)
            lines = result.stdout.splitlines()
            assert result.exit_code == 1 and len(lines) == 249 and lines[-1].startswith(
                "62 networks, 248 steps (248 to run, 0 cached); GPU hours: unknown until the data folders"), result.output
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
            assert [e.split(":")[1] for e in errors] == [" config [data] train", " config [data] val",
                                                          " config [model] spec"], errors
            assert "/data/imagenet/train is not a folder" in errors[0] and "googlenet-1378be20.pth" in errors[2]
            continue
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "conn60.pt").exists()
    assert "audit: consistent" in runner.invoke(cli, ["audit", "conn60.pt"]).output
    assert os.path.getsize(tmp_path / "mis.csv") > 0


def own_images_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### Your own images in three commands\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("misbench ")]


@pytest.mark.slow  # MobileNet-V2 at 224 pixels on 200 images; the usage block above is its fast counterpart
def test_readme_own_images_block_runs_offline_on_200_images(tmp_path, monkeypatch):
    import csv

    import numpy as np
    from PIL import Image

    from misbench.models.loading import hub_checkpoint_path, torchvision_weights

    weights = hub_checkpoint_path(torchvision_weights("mobilenet_v2", "IMAGENET1K_V1").url)
    if not weights.exists():
        pytest.skip(f"{weights.name} is not staged (make assets)")
    commands = own_images_commands()
    assert len(commands) == 3
    folder = tmp_path / "my_images"  # a plain folder of a user's images: no class folders
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"photo_{i:03d}.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    for line in commands:
        result = runner.invoke(cli, shlex.split(line)[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
    with open(tmp_path / "mine.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["layer"] for r in rows} == {"features.14", "features.18.1"}
    assert len(rows) == 160 + 1280 and (tmp_path / "mine_report" / "layers.csv").exists()


def test_readme_findings_are_the_sentences_their_numbers_give():
    """The README's findings block is what scripts/demo_findings.py generates from docs/demo_findings.json (the
    numbers of demo output folders): no sentence there was written by hand."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("demo_findings", ROOT / "scripts" / "demo_findings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(module.START) + r"\n(.*?)\n" + re.escape(module.END), text, re.S).group(1)
    data = json.loads((ROOT / "docs" / "demo_findings.json").read_text())
    assert block == module.block(data)
    # and the words follow the intervals: every paired difference called higher/lower has an interval on that
    # side of 0 (checked here against the numbers, not by the generator's own rule)
    runs = data["findings"]["runs"]
    for name, run in runs.items():
        if "paired" in run and name in block:
            d, lo, hi, _ = run["paired"]
            assert lo <= d <= hi
    for name in ("random",):
        d, lo, hi, _ = runs[name]["paired"]
        word = "lower" if hi < 0 else "higher" if lo > 0 else "no detectable difference"
        assert f"against the {data['findings']['baseline']}: {word}." in block
