"""The Python API: docs/api.md's example runs as written, and its results equal the CLI's on the same inputs."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import misbench
from conftest import make_image_folder, write_acts
from test_rehearsal import FAST_ARCHS, SLOW_ARCHS
from misbench.models.archs import build_arch
from misbench.cli.main import cli
from misbench.errors import MisbenchError

ROOT = Path(__file__).resolve().parents[1]
MINI = {"arch": "mini_inception", "num_classes": 3, "arch_kwargs": {"width": 8}}
MINI_FLAGS = ["--arch", "mini_inception", "--num-classes", "3", "--arch-kwargs", '{"width": 8}']


def doc_cells() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A random mini_inception state_dict and 420 generated images (fair selection needs 400 rows)."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    model = root / "mini.pt"
    torch.save(build_arch("mini_inception", 3, {"width": 8}).state_dict(), model)
    images = make_image_folder(root / "images", classes=3, per_class=140, size=16)
    return root, model, images


def test_docs_example_runs_and_equals_the_cli(mini, tmp_path, monkeypatch):
    root, model, images = mini
    cells = doc_cells()
    assert len(cells) == 6 and cells[0].startswith("# inputs")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(cells[0], ns)  # the user's inputs, then ours in their place
    assert set(ns) >= {"model", "model_options", "data", "layer", "limit", "work"}
    ns.update(model=str(model), model_options=MINI, data=str(images), layer="inception3a", limit=None,
              work=tmp_path / "work")
    for cell in cells[1:]:
        exec(cell, ns)

    # the same file scored by the command line
    out = tmp_path / "cli" / "mis.csv"
    r = CliRunner().invoke(cli, ["score", str(ns["acts"]), "--layer", "inception3a", "--layer", "softmax", "--out",
                                 str(out), "--similarity", "pixel", "--image-size", "32"])
    assert r.exit_code == 0, r.output
    by_cli = misbench.load_scores(out)
    pd.testing.assert_frame_equal(ns["scores"], by_cli, check_exact=True)
    pd.testing.assert_frame_equal(ns["saved"], by_cli, check_exact=True)
    assert ns["scores"].attrs["settings"] == by_cli.attrs["settings"]
    assert ns["scores"].attrs["layers"] == by_cli.attrs["layers"]
    assert list(by_cli.columns) == ("layer,unit,status,mis,mis_confidence,mis_ci_low,mis_ci_high,conf_ci_low,"
                                    "conf_ci_high,n_tasks,density,top_random,bottom_random,alpha,alpha_source").split(",")
    assert by_cli.alpha_source.eq("default").all() and by_cli.alpha.eq(by_cli.attrs["alpha"]).all()
    units = {r.name: r.n_units for r in ns["rows"]}
    assert by_cli.layer.value_counts().to_dict() == {"inception3a": units["inception3a"], "softmax": 3}

    # the reader's arrays against a direct forward pass of the network on the same preprocessed images
    loaded = misbench.load_model(str(model), **MINI)
    from misbench.datasets.sources import FolderSource, TransformedDataset
    from misbench.models.preprocess import build_transform

    source = FolderSource(str(images), images.resolve())
    pre = loaded.preprocess
    ds = TransformedDataset(source, build_transform(pre), (3, pre.crop, pre.crop), 0, len(source))
    x = torch.stack([ds[i][0] for i in range(len(source))])
    with torch.inference_mode():
        logits = loaded.model.eval()(x)
    np.testing.assert_allclose(ns["softmax"], torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert ns["labels"].tolist() == [source.label(i) for i in range(len(source))]
    assert ns["paths"][:2] == [source.path(0), source.path(1)]
    # accuracy against numpy on the same logits
    assert ns["accuracy"]["top1"] == pytest.approx(float((logits.argmax(1).numpy() == ns["labels"]).mean()))
    assert Path(ns["html"]).name == "report.html" and (tmp_path / "work" / "report" / "classwise.csv").exists()
    # pruning: half of each conv's filters are zero, as audit and the weights themselves say
    ckpt = torch.load(ns["pruned"], weights_only=True)
    convs = [k for k in ckpt["masks"] if ckpt["state_dict"][k].dim() == 4]
    assert convs and all((ckpt["state_dict"][k].flatten(1).abs().sum(1) == 0).float().mean() == pytest.approx(0.5, abs=0.13)
                         for k in convs)
    assert ns["check"]["consistent"] is True


def test_score_writes_nothing_without_out_and_rejects_unknown_options(tmp_path):
    rng = np.random.default_rng(0)
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=200, size=16)
    acts = write_acts(tmp_path / "a.h5", folder, {"l": rng.random((400, 3))})
    before = sorted(p.name for p in tmp_path.iterdir())
    df = misbench.score(acts, "l", similarity="pixel", image_size=16, n_boot=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(df) == 3 and df.status.eq("ok").all() and df.n_tasks.eq(20).all()
    # mis is the share of the tasks whose delta > 0: recompute it from the tasks file of a written run
    import h5py

    again = misbench.score(acts, ["l"], out=tmp_path / "m.csv", tasks_out=tmp_path / "t.h5", similarity="pixel",
                           image_size=16, n_boot=50)
    pd.testing.assert_frame_equal(df, again, check_exact=True)
    with h5py.File(tmp_path / "t.h5") as h5:
        delta = h5["l/delta"][...]
    np.testing.assert_allclose(df.mis.to_numpy(), ((delta > 0) + 0.5 * (delta == 0)).mean(1), atol=1e-6)
    with pytest.raises(MisbenchError, match="imagesize.*image_size"):
        misbench.score(acts, "l", imagesize=16)
    with pytest.raises(MisbenchError, match="not a mis.csv"):
        (tmp_path / "x.csv").write_text("a,b\n1,2\n")
        misbench.load_scores(tmp_path / "x.csv")


def test_layers_tells_what_extract_records(mini, tmp_path):
    root, model, images = mini
    rows = misbench.layers(str(model), **MINI)
    loaded = misbench.load_model(str(model), **MINI)
    modules = dict(loaded.model.named_modules())
    # unit counts against the modules' own sizes
    for row in rows:
        m = modules.get(row.name)
        if isinstance(m, torch.nn.Conv2d):
            assert row.n_units == m.out_channels and row.kind == "conv"
        elif isinstance(m, torch.nn.BatchNorm2d):
            assert row.n_units == m.num_features
        elif isinstance(m, torch.nn.Linear):
            assert row.n_units == m.out_features and row.kind == "linear"
    assert [(r.name, r.n_units) for r in rows[-2:]] == [("logits", 3), ("softmax", 3)]
    # `conv` expands to exactly the rows marked in_conv, with their unit counts
    acts = misbench.extract(str(model), str(images), "conv", tmp_path / "a.h5", limit=8, **MINI)
    with misbench.open_activations(acts) as f:
        recorded = {name: f.activations(name).shape[1] for name in f.layer_names}
    assert recorded == {r.name: r.n_units for r in rows if r.in_conv}
    # the command prints one line per layer with the same numbers
    r = CliRunner().invoke(cli, ["layers", str(model), *MINI_FLAGS])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    printed = {line.split()[0]: int(line.split()[2]) for line in lines[1:-1]}
    assert printed == {row.name: row.n_units for row in rows}
    assert lines[-1].startswith(f"conv = {len(recorded)} modules, {sum(recorded.values())} units")


def test_layers_of_torchvision_architectures_and_class_names():
    rows = misbench.layers("resnet18:random")
    by_name = {r.name: r for r in rows}
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            assert by_name[name].n_units == module.out_channels
    assert by_name["fc"].n_units == 1000 and by_name["layer4.1.bn2"].in_conv
    googlenet = {r.name for r in misbench.layers("googlenet:random")}
    assert "inception4a.branch2.1.bn" in googlenet and not any(n.startswith("aux") for n in googlenet)
    # class names of the outputs from the weights' metadata (the staged MobileNetV2 file, `make assets`)
    rows = misbench.layers("mobilenet_v2:IMAGENET1K_V1")
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert [r.classes for r in rows[-2:]] == [tuple(categories)] * 2 and rows[-1].n_units == len(categories) == 1000
    r = CliRunner().invoke(cli, ["layers", "mobilenet_v2:IMAGENET1K_V1"])
    assert r.exit_code == 0 and "softmax" in r.output and ", ".join(categories[:5]) in r.output


# every architecture docs/installation.md names (the rehearsal's lists), plus the transformers of docs/mis.md
DOC_ARCHS = FAST_ARCHS + SLOW_ARCHS + ["vit_b_16", "swin_t"]


@pytest.mark.parametrize("arch", DOC_ARCHS)
def test_layers_lists_every_conv_and_linear_of_each_documented_architecture(arch):
    """Against torchvision's own model: each Conv2d/Linear that an eval-mode forward runs as a module is a row
    with its out_channels/out_features as units (aux heads do not run; Swin's attention uses its Linear weights
    functionally), and the class layers have the model's 1000 outputs."""
    import torchvision

    rows = {r.name: r for r in misbench.layers(f"{arch}:random")}
    with torch.device("meta"):  # shapes only: no weights to initialise, no arithmetic in the forward
        reference = torchvision.models.get_model(arch, weights=None).eval()
    expected = {}
    for name, m in reference.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            axis = 1 if isinstance(m, torch.nn.Conv2d) else -1  # Linear acts on the last axis (Swin: [N, H, W, C])
            m.register_forward_hook(lambda mod, i, out, name=name, axis=axis: expected.__setitem__(name, out.shape[axis]))
    with torch.no_grad():
        size = 299 if arch == "inception_v3" else 224
        reference(torch.zeros(1, 3, size, size, device="meta"))
    assert len(expected) > 5
    assert {name: rows[name].n_units for name in expected if name in rows} == expected
    assert rows["softmax"].n_units == rows["logits"].n_units == 1000
    assert any(r.in_conv for r in rows.values()) or any(r.in_mlp for r in rows.values())


def test_unknown_layer_suggests_close_names(mini, tmp_path):
    root, model, images = mini
    r = CliRunner().invoke(cli, ["extract", str(model), *MINI_FLAGS, "--data", str(images), "--layers", "inception3x",
                                 "--out", str(tmp_path / "a.h5")])
    assert r.exit_code == 1 and "inception3a" in r.output and not (tmp_path / "a.h5").exists()


def test_writing_functions_refuse_existing_outputs_unless_overwrite(tmp_path):
    """score/evaluate/report refuse like the CLI; a killed run's leftovers of the same call are replaced."""
    import h5py

    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=200, size=16)
    acts = write_acts(tmp_path / "a.h5", folder, {"l": np.random.default_rng(0).random((400, 3))})
    kw = dict(similarity="pixel", image_size=16, tasks=5, n_boot=10)
    mis, tasks = tmp_path / "m.csv", tmp_path / "t.h5"
    misbench.score(acts, "l", out=mis, tasks_out=tasks, **kw)
    (tmp_path / "x.json").write_text('{"precious": 1}')  # a sidecar without its csv, from no misbench run
    kept = {p: p.read_bytes() for p in (mis, mis.with_suffix(".json"), tasks, tmp_path / "x.json")}
    for out, tasks_out, what in [(tmp_path / "m2.csv", tasks, "tasks_out: "), (mis, None, "out: "),
                                 (tmp_path / "x.csv", None, "out: ")]:
        with pytest.raises(MisbenchError) as err:
            misbench.score(acts, "l", out=out, tasks_out=tasks_out, **{**kw, "tasks": 4})
        assert str(err.value).startswith(what) and "overwrite=True" in str(err.value)
        assert "--overwrite" not in str(err.value)
    assert {p: p.read_bytes() for p in kept} == kept
    # a killed run of the same call left tasks.h5 and mis.json but no mis.csv: the rerun replaces them
    mis.unlink()
    again = misbench.score(acts, "l", out=mis, tasks_out=tasks, **kw)
    assert again.mis.tolist() == pd.read_csv(mis).mis.tolist()
    misbench.score(acts, "l", out=tmp_path / "m2.csv", tasks_out=tasks, overwrite=True, **{**kw, "tasks": 4})
    with h5py.File(tasks) as h5:
        assert h5["l/delta"].shape == (3, 4)

    misbench.evaluate(acts=acts, out=tmp_path / "e.json")
    with pytest.raises(MisbenchError, match="out: .*e.json already exists; pass overwrite=True"):
        misbench.evaluate(acts=acts, out=tmp_path / "e.json")
    misbench.evaluate(acts=acts, out=tmp_path / "e.json", overwrite=True)
    misbench.report("layers", tmp_path / "rl", scores=mis)
    layers_csv = (tmp_path / "rl" / "layers.csv").read_bytes()
    with pytest.raises(MisbenchError, match="layers.csv already exists; pass overwrite=True"):
        misbench.report("layers", tmp_path / "rl", scores=tmp_path / "m2.csv")
    assert (tmp_path / "rl" / "layers.csv").read_bytes() == layers_csv
    misbench.report("layers", tmp_path / "rl", scores=tmp_path / "m2.csv", overwrite=True)

    # the command line: the same check, in its own words; merge-scores --tasks-out too
    runner = CliRunner()
    score = ["score", str(acts), "--layer", "l", "--similarity", "pixel", "--image-size", "16", "--tasks", "5",
             "--bootstrap", "10"]
    res = runner.invoke(cli, [*score, "--out", str(tmp_path / "m3.csv"), "--tasks-out", str(tasks)])
    assert res.exit_code == 1 and f"--tasks-out: {tasks} already exists" in res.output and "pass --overwrite" in res.output
    for i in (0, 1):
        res = runner.invoke(cli, [*score, "--out", str(tmp_path / f"p{i}.csv"), "--shard", f"{i}/2", "--tasks-out",
                                  str(tmp_path / f"pt{i}.h5")])
        assert res.exit_code == 0, res.output
    parts = [str(tmp_path / f"p{i}.csv") for i in (0, 1)]
    before = tasks.read_bytes()
    res = runner.invoke(cli, ["merge-scores", *parts, "--out", str(tmp_path / "merged.csv"), "--tasks-out", str(tasks)])
    assert res.exit_code == 1 and "--tasks-out" in res.output and tasks.read_bytes() == before
    res = runner.invoke(cli, ["merge-scores", *parts, "--out", str(tmp_path / "merged.csv"), "--tasks-out",
                              str(tmp_path / "merged.h5")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("call,expected", [
    (lambda: misbench.score("a.h5", "all", tasks="10"), "score option tasks='10': expected an integer, got str"),
    (lambda: misbench.score("a.h5", "all", image_size=16.5), "image_size=16.5: expected an integer (or None)"),
    (lambda: misbench.score("a.h5", "all", similarity=3), "similarity=3: expected a string, got int"),
    (lambda: misbench.score("a.h5", 3), "layers=3: expected names"),
    (lambda: misbench.score("a.h5", ""), "layers='': expected layer names or 'all'"),
    (lambda: misbench.score("a.h5", "all", alpha_source="user"), "unknown score option 'alpha_source'"),
    (lambda: misbench.prune("m.pt", "structured", "0.5", "p.pt"), "prune option rate='0.5': expected a number"),
    (lambda: misbench.prune("m.pt", "structured", 0.5, "p.pt", epochs=1.5), "training option epochs=1.5"),
    (lambda: misbench.layers("mini_inception", num_class=3), "unknown model option 'num_class'"),
    # overwrite="no" is not False: flags are True or False (it replaced an existing output by truthiness)
    (lambda: misbench.extract("m.pt", "d", "conv", "a.h5", overwrite="no"), "extract overwrite='no': expected True or False"),
    (lambda: misbench.score("a.h5", "all", "m.csv", overwrite="no"), "score overwrite='no': expected True or False"),
    (lambda: misbench.prune("m.pt", "structured", 0.5, "p.pt", resume=1), "training resume=1: expected True or False"),
    (lambda: misbench.study({}, "s", dry_run="yes"), "study dry_run='yes': expected True or False"),
    (lambda: misbench.extract("m.pt", "d", "conv", None), "extract out=None: expected a path"),
    (lambda: misbench.report("layers", None, scores="m.csv"), "report out=None: expected a path"),
    (lambda: misbench.score("a.h5", "all", cache=123), "score cache=123: expected a path (or None), got int"),
    (lambda: misbench.score("a.h5", "all", seed=-1), "score option seed: must be at least 0, got -1"),
    (lambda: misbench.score("a.h5", "all", image_size=100000), "score option image_size: must be at most 1024"),
    (lambda: misbench.score("a.h5", "all", selection="fiar"), "'fiar' is not allowed; expected one of fair, quantile"),
    (lambda: misbench.extract("m.pt", "d", "conv", "a.h5", limit=0), "extract option limit: must be at least 1"),
    (lambda: misbench.evaluate("m.pt", "d", batch_size="64"), "evaluate option batch_size='64': expected an integer"),
    (lambda: misbench.layers("mini_inception", num_classes=0), "model option num_classes: must be at least 1"),
    (lambda: misbench.layers(3), "model=3: expected a MODEL string"),
])
def test_wrong_api_argument_types_are_one_line_errors(call, expected):
    """Checked before any file is read: a MisbenchError naming the option, not a TypeError from deep inside."""
    with pytest.raises(MisbenchError) as err:
        call()
    assert expected in str(err.value) and "\n" not in str(err.value)


GOOD_SCORES = ("layer,unit,status,mis,mis_confidence,mis_ci_low,mis_ci_high,conf_ci_low,conf_ci_high,n_tasks\n"
               "a,0,ok,1,0.9,0.8,1,0.85,0.95,20\na,1,constant,,,,,,,0\nb,0,ok,0.75,0.7,0.5,0.9,0.6,0.8,20\n")


@pytest.mark.parametrize("old,new,expected", [
    ("a,0,ok,1,", "a,0,ok,1.7,", "row 2: mis 1.7 is outside [0, 1]"),
    ("b,0,", "a,0,", "row 4: unit a:0 appears twice"),
    ("b,0,ok", "b,0,weird", "row 4: status 'weird' is not one of ok, constant, sparse"),
    ("a,1,constant,,", "a,1,constant,0.5,", "row 3: a constant unit has no mis value"),
    ("b,0,ok,0.75,", "b,0,ok,,", "row 4: status ok needs a mis value"),
    ("b,0,", "b,1.5,", "row 4: unit 1.5 is not a non-negative integer"),
    ("b,0,", "b,-4,", "row 4: unit -4 is not a non-negative integer"),
    ("0.7,0.5", "abc,0.5", "row 4: mis_confidence 'abc' is not a number"),
])
def test_load_scores_refuses_what_no_mis_csv_holds(tmp_path, old, new, expected):
    path = tmp_path / "mis.csv"
    path.write_text(GOOD_SCORES)
    assert len(misbench.load_scores(path)) == 3  # the unedited file loads
    path.write_text(GOOD_SCORES.replace(old, new, 1))
    with pytest.raises(MisbenchError) as err:
        misbench.load_scores(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_load_scores_of_a_folder_names_the_file_to_give(tmp_path):
    (tmp_path / "mis.csv").write_text(GOOD_SCORES)
    with pytest.raises(MisbenchError) as err:
        misbench.load_scores(tmp_path)
    assert "is a folder; it holds mis.csv: give the mis.csv file" in str(err.value) and "\n" not in str(err.value)
    assert len(misbench.load_scores(tmp_path / "mis.csv")) == 3


def test_load_scores_of_a_binary_file_is_a_clear_error(tmp_path):
    (tmp_path / "acts.h5").write_bytes(b"\x89HDF\r\n\x1a\n\x00\xff\xfe" * 50)
    with pytest.raises(MisbenchError, match="acts.h5 is not a mis.csv"):
        misbench.load_scores(tmp_path / "acts.h5")
