import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY_ARCH, make_image_folder, trust_standins, write_study
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.runtime.fileio import sha256_file
from misbench.studies.run import Study, demo_config_path
from misbench.studies.config import load_config, parse_config


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("study") / "images", classes=3, per_class=50, size=16)


def write_config(path, data, similarity="pixel"):
    """The tiny study with its network built from mini_inception and trained one epoch on `data`."""
    return write_study(path, study={"name": "tiny", "seed": 0}, model=TINY_ARCH, data={"train": data, "val": data},
                       train={"epochs": 1, "batch_size": 64}, retrain={"batch_size": 64},
                       extract={"batch_size": None}, score={"similarity": similarity, "n_boot": 50, "tasks": 5,
                                                            "explanations": 4})


def test_tiny_study_caches_and_reruns_only_what_changed(tmp_path, study_data, monkeypatch):
    config = write_config(tmp_path / "study.toml", study_data)
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(cli, ["study", str(config), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "base" in r.output and "structured-l1-0.5-oneshot" in r.output and "report:" in r.output
    assert "[step 1/9] running train:base, elapsed 0:00:00, estimate after the first step" in r.output
    assert "[step 9/9] running report, elapsed" in r.output and "left" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["steps"]
    assert set(steps) == {"train:base", "prune:structured-l1-0.5-oneshot", "eval:base", "extract:base", "score:base",
                          "eval:structured-l1-0.5-oneshot", "extract:structured-l1-0.5-oneshot",
                          "score:structured-l1-0.5-oneshot", "report"}
    for entry in steps.values():
        assert entry["status"] == "done" and entry["seconds"] >= 0
        for record in entry["outputs"].values():
            assert sha256_file(record["path"]) == record["sha256"]
    assert steps["extract:base"]["inputs"]["model"]["sha256"] == steps["train:base"]["outputs"]["checkpoint"]["sha256"]
    sweep = (out / "report" / "sweep.csv").read_text().splitlines()
    assert len(sweep) == 3 and (out / "report" / "report.html").exists()
    # a second invocation runs no step
    r = runner.invoke(cli, ["study", str(config), "--out", str(out), "--dry-run"])
    assert r.exit_code == 0 and "run   " not in r.output
    assert [line.split()[0] for line in r.stdout.splitlines()[:-1]] == ["cached"] * 9
    assert r.stdout.splitlines()[-1].startswith("2 networks, 9 steps (0 to run, 9 cached); about 0.0 GPU hours")
    before = {name: e["finished_utc"] for name, e in steps.items()}
    r = runner.invoke(cli, ["study", str(config), "--out", str(out)])
    assert r.exit_code == 0 and "0 steps ran" in r.output
    # another similarity backend: only scoring and the report run again
    write_config(config, study_data, similarity="lpips-alex")
    study = Study(load_config(config), out)
    plan = dict(study.plan())
    assert {n for n, s in plan.items() if s == "run"} == {"score:base", "score:structured-l1-0.5-oneshot", "report"}
    write_config(config, study_data, similarity="deepfeat:resnet18")  # no weights offline: scoring fails
    import torch, torchvision  # noqa: E401

    # stand-in weights for resnet18 in the test's own hub cache keep this offline
    state = torchvision.models.resnet18(weights=None).state_dict()
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(state, hub / "resnet18-f37072fd.pth")
    with monkeypatch.context() as patch:
        trust_standins(patch, tmp_path / "torch")  # the stand-in is not the file its name promises
        r = runner.invoke(cli, ["study", str(config), "--out", str(out)])
    assert r.exit_code == 0, r.output
    after = json.loads((out / "manifest.json").read_text())["steps"]
    rerun = {n for n in after if after[n]["finished_utc"] != before[n]}
    assert rerun == {"score:base", "score:structured-l1-0.5-oneshot", "report"}
    assert json.loads((out / "runs" / "base" / "mis.json").read_text())["settings"]["similarity"] == "deepfeat:resnet18"


def test_failed_step_is_recorded_and_resumed(tmp_path, study_data, monkeypatch):
    config = load_config(write_config(tmp_path / "s.toml", study_data))
    out = tmp_path / "out"
    from misbench.studies.run import Study

    calls = {"n": 0}
    original = Study._score

    def flaky(self, acts, target):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return original(self, acts, target)

    monkeypatch.setattr(Study, "_score", flaky)
    with pytest.raises(RuntimeError):
        Study(config, out).run()
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    failed = [n for n, e in steps.items() if e["status"] == "failed"]
    assert failed == ["score:structured-l1-0.5-oneshot"] and "disk full" in steps[failed[0]]["error"]
    result = Study(config, out).run()
    assert result["ran"] == ["score:structured-l1-0.5-oneshot", "report"]


def test_invalid_configs_name_the_key_and_allowed_values(tmp_path):
    base = {"model": {"spec": "resnet18"}, "data": {"val": "digits", "train": "digits"}}
    with pytest.raises(MisbenchError, match=r"\[pruning\] methods: 'magnitude' is not allowed; expected one of "
                                            "unstructured, structured, connection"):
        parse_config({**base, "pruning": {"methods": ["magnitude"]}})
    with pytest.raises(MisbenchError, match=r"\[score\]: unknown key 'similiarity'; allowed keys: .*similarity"):
        parse_config({**base, "score": {"similiarity": "pixel"}})
    with pytest.raises(MisbenchError, match=r"\[score\] similarity: 'lpips-alexx' is not allowed; expected one of"):
        parse_config({**base, "score": {"similarity": "lpips-alexx"}})
    with pytest.raises(MisbenchError, match=r"rates: 1.5 is not a fraction"):
        parse_config({**base, "pruning": {"rates": [0.2, 1.5]}})
    (tmp_path / "bad.toml").write_text("[model\nspec=1")
    r = CliRunner().invoke(cli, ["study", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not valid TOML" in r.output


def test_shipped_configs_parse_and_plan():
    demo = load_config(demo_config_path())
    names = [r.name for r in demo.runs()]
    assert names[:3] == ["base", "control", "random"] and len(names) == 3 + 6 + 6 + 2
    assert {r.method for r in demo.runs()} == {"none", "random", "unstructured", "structured", "connection"}
    assert any(r.schedule == "iterative" for r in demo.runs())
    quick = load_config(demo_config_path(), quick=True)
    assert quick["extract"]["limit"] == 500 and len(quick.runs()) < len(names)
    full = load_config(Path(__file__).resolve().parents[1] / "data" / "googlenet_imagenet.toml")
    runs = full.runs()
    assert full["model"]["spec"] == "googlenet:IMAGENET1K_V1" and full["score"]["similarity"] == "lpips-alex"
    assert {r.rate for r in runs if r.method != "none"} == {0.2, 0.4, 0.6, 0.8}
    assert {(r.schedule, r.steps) for r in runs if r.method != "none"} == {("oneshot", 1), ("iterative", 4)}


def test_study_refuses_torchrun(tmp_path, study_data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from misbench.studies.run import run_study

    with pytest.raises(MisbenchError, match="without torchrun"):
        run_study(load_config(write_config(tmp_path / "s.toml", study_data)), tmp_path / "o")


def test_random_baseline_is_the_untrained_initialisation(tmp_path, study_data):
    import torch

    from misbench.models.archs import build_arch
    from misbench.models.checkpoint import load_checkpoint_dict

    config = write_config(tmp_path / "study.toml", study_data)
    config.write_text(config.read_text().replace("control = false", "control = false\nrandom_baseline = true"))
    study = Study(load_config(config), tmp_path / "out")
    random_run = [r for r in study.runs if r.name == "random"]
    assert random_run and random_run[0].method == "random" and not random_run[0].retrained
    init = next(s for s in study.steps if s.name == "init:random")
    init.action(False)
    saved = load_checkpoint_dict(tmp_path / "out" / "runs" / "random" / "model.pt")["state_dict"]
    torch.manual_seed(0)  # the study's seed: the base network starts from exactly these weights
    fresh = build_arch("mini_inception", 3, {"width": 8}).state_dict()
    assert saved.keys() == fresh.keys() and all(torch.equal(saved[k], fresh[k]) for k in fresh)
    assert [s.name for s in study.steps if s.name.endswith(":random")] == ["init:random", "eval:random",
                                                                            "extract:random", "score:random"]


DICTIONARY = """
[dictionary]
layer = "conv1.bn"
name = "sae"
n_features = 16
k = 2
steps = {steps}
batch_size = 64
train_limit = 100
"""


def test_study_trains_a_dictionary_and_reports_neurons_against_features(tmp_path, study_data):
    import csv

    import h5py
    import torch

    config = write_config(tmp_path / "study.toml", study_data)
    config.write_text(config.read_text() + DICTIONARY.format(steps=40))
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(cli, ["study", str(config), "--out", str(out)])
    assert r.exit_code == 0, r.output
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    for name in ("extract:dictionary-train", "dictionary", "extract:dictionary", "score:dictionary"):
        assert steps[name]["status"] == "done", name
    d = out / "dictionary"
    saved = torch.load(d / "dictionary.pt", weights_only=True)
    assert tuple(saved["W_enc"].shape) == (16, 8) and saved["activation"] == "topk:2"
    assert saved["training"]["steps"] == 40 and saved["training"]["n_rows"] == 100  # train_limit training images (of 150)
    assert saved["training"]["acts_sha256"] == sha256_file(d / "train_acts.h5")
    with h5py.File(d / "acts.h5") as f:
        attrs = f["layers/sae"].attrs
        assert attrs["kind"] == "features" and attrs["module"] == "conv1.bn" and attrs["n_units"] == 16
        assert attrs["dictionary_sha256"] == sha256_file(d / "dictionary.pt")
        assert f["layers/conv1.bn/activations"].shape[1] == 8
    # the study's comparison is `report compare` run by hand on the same mis.csv
    by_hand = tmp_path / "by_hand"
    r = runner.invoke(cli, ["report", "compare", "--scores", f"neurons={d / 'mis.csv'}:conv1.bn",
                            "--scores", f"features={d / 'mis.csv'}:sae", "--out", str(by_hand), "--n-boot", "50"])
    assert r.exit_code == 0, r.output
    study_rows = list(csv.DictReader((out / "report" / "compare" / "compare.csv").open()))
    hand_rows = list(csv.DictReader((by_hand / "compare.csv").open()))
    assert study_rows == hand_rows and [row["population"] for row in study_rows] == ["neurons", "features"]
    assert [row["layer"] for row in study_rows] == ["conv1.bn", "sae"] and study_rows[1]["n_units"] == "16"
    study_json = json.loads((out / "report" / "compare" / "compare.json").read_text())
    assert study_json["comparisons"] == json.loads((by_hand / "compare.json").read_text())["comparisons"]
    html = (out / "report" / "report.html").read_text()
    assert "Unit populations compared" in html and "compare/compare.png" in html
    # the runs' sweep is untouched by the dictionary: it has its own folder, not a run's layer
    assert "sae" not in (out / "runs" / "base" / "mis.csv").read_text()
    # a changed dictionary recipe reruns the dictionary's steps and the report only
    config.write_text(config.read_text().replace("steps = 40", "steps = 41"))
    plan = dict(Study(load_config(config), out).plan())
    assert {n for n, s in plan.items() if s == "run"} == {"dictionary", "extract:dictionary", "score:dictionary", "report"}
    # [dictionary] as a grid with controls: two widths, each with its untrained twin and permuted features
    config.write_text(config.read_text().replace('name = "sae"', 'name = "sae"\nexpansions = [1, 2]\nks = [2]\n'
                                                 'controls = true\nmetrics = ["mis", "ms"]'))
    r = runner.invoke(cli, ["study", str(config), "--out", str(out)])
    assert r.exit_code == 0, r.output
    for width in (1, 2):
        name = f"conv1_bn_topk_x{width}_k2"
        saved = torch.load(d / f"{name}.pt", weights_only=True)
        untrained = torch.load(d / f"untrained_{name}.pt", weights_only=True)
        assert saved["W_enc"].shape == untrained["W_enc"].shape == (8 * width, 8)
        assert untrained["training"]["control"] == "untrained" and saved["training"]["kind"] == "topk"
    with h5py.File(d / "acts_controls.h5") as f:
        assert {"conv1_bn_topk_x1_k2_permuted", "conv1_bn_topk_x2_k2_untrained"} <= set(f["layers"])
    rows = list(csv.DictReader((out / "report" / "dictionaries" / "dictionaries.csv").open()))
    assert [row["label"] for row in rows] == ["neurons", "topk x1 k2", "topk x1 k2 untrained", "topk x1 k2 permuted",
                                              "topk x2 k2", "topk x2 k2 untrained", "topk x2 k2 permuted"]
    assert rows[1]["fvu"] != "" and rows[1]["diff_mis"] != ""
    # [dictionary] metrics: MS for the dictionaries' scoring only; the runs keep [score] metrics (MIS)
    assert all(row["ms"] != "" for row in rows) and "ms" in (d / "mis.csv").read_text().splitlines()[0].split(",")
    assert "ms" not in (out / "runs" / "base" / "mis.csv").read_text().splitlines()[0].split(",")
    # the report shows that table and the difference against depth; the study prints it row by row
    html = (out / "report" / "report.html").read_text()
    assert "Dictionary features against neurons" in html and "dictionaries/dictionaries.png" in html
    assert "data-csv='dictionaries/dictionaries.csv'" in html and "topk x2 k2 permuted" in html
    printed = [line.split() for line in r.output.splitlines() if line.startswith("conv1.bn ")]
    for row, line in zip(rows, printed):
        text = " ".join(line)
        assert text.startswith(f"conv1.bn {row['label']} "), (row, text)
        assert f" {row['n_units']} {row['n_scored']} {float(row['mis']):.3f} " in f" {text} ", (row, text)
        if row["diff_mis"]:
            assert f"{float(row['diff_mis']):+.3f} [{float(row['diff_ci_low']):+.3f}," in text
    assert len(printed) == len(rows)
    # positions = N: the grid trains on per-position vectors of the base network (no training-image extraction),
    # each dictionary the one `train-dictionary --positions N` writes from the same checkpoint, images and seed
    config.write_text(config.read_text().replace("controls = true", "controls = true\npositions = 300"))
    study = Study(load_config(config), out)
    assert "extract:dictionary-train" not in [s.name for s in study.steps]
    step = next(s for s in study.steps if s.name == "dictionary")
    assert step.inputs == {"model": out / "base" / "model.pt"} and step.settings["positions"] == 300
    assert dict(study.plan())["dictionary"] == "run"
    step.action(False)
    r = runner.invoke(cli, ["train-dictionary", "--positions", "300", "--model", str(out / "base" / "model.pt"),
                            "--data", str(study_data), "--limit", "100", "--layer", "conv1.bn", "--expansion", "2",
                            "--k", "2", "--steps", "41", "--batch-size", "64", "--seed", "0", "--device", "cpu",
                            "--out", str(tmp_path / "by_hand.pt")])
    assert r.exit_code == 0, r.output
    mine, by_hand = torch.load(d / "conv1_bn_topk_x2_k2.pt", weights_only=True), torch.load(tmp_path / "by_hand.pt",
                                                                                          weights_only=True)
    assert mine["training"]["vectors"] == "positions" and mine["training"]["n_vectors"] == 300
    assert mine["training"]["positions_seen"] == 100 * 16 * 16  # train_limit 100 images x conv1's 16 x 16 positions
    assert all(torch.equal(mine[k], by_hand[k]) for k in ("W_enc", "b_enc", "b_dec", "W_dec"))
    config.write_text(config.read_text().replace("positions = 300\n", ""))
    # [extract] token_reduction and features reach every run's extraction; the feature file is a step input
    config.write_text(config.read_text().replace('layers = ["conv1.bn", "softmax"]', 'layers = ["conv1.bn", "softmax"]\n'
                      f'token_reduction = "max"\nfeatures = ["f=conv1.bn:{(d / "dictionary.pt").as_posix()}"]'))
    study = Study(load_config(config), out)
    step = next(s for s in study.steps if s.name == "extract:base")
    assert step.inputs["features:f"] == d / "dictionary.pt" and dict(study.plan())["extract:base"] == "run"
    assert next(s for s in study.steps if s.name == "extract:dictionary-train").settings["features"] == []
    step.action(False)
    with h5py.File(step.outputs["acts"]) as f:
        assert f["layers/f"].attrs["kind"] == "features" and f["layers/f"].attrs["n_units"] == 16
        assert f.attrs["token_reduction"] == "max"


@pytest.mark.parametrize("section,values,message", [
    ("dictionary", {"layer": "conv1.bn", "k": 9, "n_features": 8}, "[dictionary] k: 9 exceeds n_features 8"),
    ("dictionary", {"layer": "conv1.bn", "steps": "300"}, "[dictionary] steps: expected an integer"),
    ("dictionary", {"layer": "conv1.bn,conv2"}, "[dictionary] layer: expected one module name"),
    ("dictionary", {"layer": "conv1.bn", "name": "conv1.bn"}, "[dictionary] name: 'conv1.bn' must be a new"),
    ("dictionary", {"layer": "conv1.bn", "positions": 1}, "[dictionary] positions: must be at least 2, got 1"),
    ("dictionary", {"layer": "conv1.bn", "metrics": ["ms"]}, "[dictionary] metrics: --metrics ms: expected mis"),
    ("dictionary", {"layer": "conv1.bn", "positions": "1000"}, "[dictionary] positions: expected an integer"),
    ("extract", {"token_reduction": "first"}, "[extract] token_reduction: 'first' is not allowed; expected one of mean"),
    ("extract", {"features": ["sae.pt"]}, "[extract] features: --features 'sae.pt': expected NAME=LAYER:FILE"),
])
def test_dictionary_and_token_config_keys_are_checked(section, values, message):
    base = {"model": {"spec": "resnet18"}, "data": {"val": "digits", "train": "digits"}}
    with pytest.raises(MisbenchError) as err:
        parse_config({**base, section: values})
    assert message in str(err.value)


def test_a_changed_image_folder_reruns_the_steps_that_read_it(tmp_path, study_data):
    """Step keys fingerprint the image folders a step reads (paths, sizes, mtimes): one image of the
    extraction folder regenerated in place (same name, new pixels) reruns extract and score of every run,
    while training, pruning and eval (which read the other folder) stay cached."""
    import os
    import shutil

    import numpy as np
    from PIL import Image

    probe = tmp_path / "probe"
    shutil.copytree(study_data, probe)
    config = write_config(tmp_path / "study.toml", study_data)
    config.write_text(config.read_text().replace('[extract]\n', f'[extract]\ndata = "{probe}"\n'))
    out = tmp_path / "out"
    study = Study(load_config(config), out)
    study.run()
    assert {state for _, state in study.plan()} == {"cached"}
    manifest = json.loads((out / "manifest.json").read_text())  # the fingerprint a step's key holds, once per folder
    assert manifest["steps"]["extract:base"]["data"] == {str(probe): manifest["steps"]["score:base"]["data"][str(probe)]}
    image = sorted(probe.rglob("*.png"))[7]
    stat = image.stat()
    pixels = np.asarray(Image.open(image).convert("RGB"))
    Image.fromarray(255 - pixels).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a regeneration one second later
    plan = dict(Study(load_config(config), out).plan())
    assert {name for name, state in plan.items() if state == "run"} >= \
        {"extract:base", "score:base", "extract:structured-l1-0.5-oneshot", "score:structured-l1-0.5-oneshot"}
    assert all(plan[name] == "cached" for name in ("train:base", "prune:structured-l1-0.5-oneshot", "eval:base",
                                                   "eval:structured-l1-0.5-oneshot"))
    # a study runs what its plan says (test_tiny_study_caches_and_reruns_only_what_changed runs one)
