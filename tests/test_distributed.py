"""torchrun with two CPU processes (gloo): the same command line writes the same outputs."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import make_image_folder
from misbench.models.archs import build_arch
from misbench.activations.extract import ExtractSettings, extract
from misbench.models.loading import load_model
from misbench.runtime import distributed
from misbench.scoring.run import ScoreSettings, merge_scores, score

MISBENCH = shutil.which("misbench") or str(Path(sys.executable).with_name("misbench"))


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_command(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
            MISBENCH, "-q", *map(str, args)]


def torchrun(*args, cwd, check=True):
    # torchrun leaves a torchelastic_* folder in TMPDIR after every launch: give it one we remove
    with tempfile.TemporaryDirectory(prefix="torchrun-") as scratch:
        result = subprocess.run(torchrun_command(*args), cwd=cwd, env={**TORCHRUN_ENV, "TMPDIR": scratch},
                                capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(autouse=True)
def one_thread():
    """torchrun gives each rank one thread; CPU kernels sum in a thread-count-dependent order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    folder = make_image_folder(root / "images", classes=3, per_class=150, size=16)
    torch.manual_seed(0)
    torch.save(build_arch("mini_inception", 3, {"width": 8}).state_dict(), root / "model.pt")
    return root, folder


def datasets(path):
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
    return out


def _single(root, folder):
    loaded = load_model(str(root / "model.pt"), arch="mini_inception", num_classes=3, arch_kwargs={"width": 8})
    out = root / "single.h5"
    if not out.exists():
        extract(loaded, str(folder), out, ExtractSettings(layers=("conv", "softmax"), resize=16, crop=16, batch_size=40))
    return out


DIST_COMMON = ["model.pt", "--arch", "mini_inception", "--num-classes", "3", "--arch-kwargs", '{"width": 8}',
               "--layers", "conv,softmax", "--resize", "16", "--crop", "16", "--batch-size", "40"]
SCORE_SETTINGS = dict(similarity="pixel", image_size=16, device="cpu", n_boot=50, tasks=10)


def ranks_in_turn(monkeypatch, size: int, run) -> None:
    """What torchrun does, in this process: `run()` as each rank of `size` in turn, the last rank first so that
    rank 0 finds every part to merge. No process group: barriers are no-ops without one."""
    monkeypatch.setattr(distributed, "ensure_initialized", lambda device=None: None)
    monkeypatch.setenv("WORLD_SIZE", str(size))
    for rank in reversed(range(size)):
        monkeypatch.setenv("RANK", str(rank))
        run()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")


def _same_datasets(a, b, exact_sums=True):
    a, b = datasets(a), datasets(b)
    assert a.keys() == b.keys()
    for key in a:
        if exact_sums or not key.endswith("sum"):
            assert np.array_equal(a[key], b[key]), key
        else:  # the parts' sums add in another order
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12)


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_extraction_parts_merge_to_one_process(setup, tmp_path, monkeypatch, size):
    """The default suite's share of the torchrun test below: each rank's block of whole batches into its part,
    rank 0's merge, in one process."""
    root, folder = setup
    single = _single(root, folder)
    loaded = load_model(str(root / "model.pt"), arch="mini_inception", num_classes=3, arch_kwargs={"width": 8})
    settings = ExtractSettings(layers=("conv", "softmax"), resize=16, crop=16, batch_size=40)
    ranks_in_turn(monkeypatch, size, lambda: extract(loaded, str(folder), tmp_path / "dist.h5", settings))
    _same_datasets(single, tmp_path / "dist.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["dist.h5"]  # no part or partial left


@pytest.mark.slow
def test_distributed_extraction_equals_one_process(setup):
    root, folder = setup
    single = _single(root, folder)
    torchrun("extract", *DIST_COMMON, "--data", str(folder), "--out", "dist.h5", cwd=root)
    _same_datasets(single, root / "dist.h5")
    assert not list(root.glob("dist.h5.partial*"))


def test_sharded_scoring_merges_to_one_process(setup):
    """What torchrun scoring does (rank i scores shard i/N, rank 0 merges), in one process: the fast part of
    the suite; test_torchrun_scoring_equals_one_process (-m slow) runs it under torchrun."""
    root, folder = setup
    single = _single(root, folder)
    settings = ScoreSettings(**SCORE_SETTINGS)
    score(single, ["all"], settings, root / "one.csv", tasks_out=root / "one_tasks.h5")
    parts, tasks = [], []
    for i in range(3):
        score(single, ["all"], settings, root / f"s{i}.csv", tasks_out=root / f"s{i}_tasks.h5", shard=(i, 3))
        parts.append(root / f"s{i}.csv")
        tasks.append(root / f"s{i}_tasks.h5")
    merge_scores(parts, root / "merged.csv", root / "merged_tasks.h5")
    assert (root / "merged.csv").read_text() == (root / "one.csv").read_text()
    ta, tb = datasets(root / "one_tasks.h5"), datasets(root / "merged_tasks.h5")
    assert all(np.array_equal(ta[k], tb[k], equal_nan=True) for k in ta) and ta.keys() == tb.keys()


@pytest.mark.slow
def test_torchrun_scoring_equals_one_process(setup):
    root, folder = setup
    single = _single(root, folder)
    settings = ScoreSettings(**SCORE_SETTINGS)
    if not (root / "one.csv").exists():
        score(single, ["all"], settings, root / "one.csv", tasks_out=root / "one_tasks.h5")
    # scoring under torchrun: units sharded over ranks, merged by rank 0
    # both ranks embed into one --cache directory at the same time (a rank that starts late may find
    # all its images cached by the other)
    shutil.copy(single, root / "dist_score.h5")
    torchrun("score", "dist_score.h5", "--layer", "all", "--similarity", "pixel", "--image-size", "16", "--tasks", "10",
             "--n-boot", "50", "--out", "two.csv", "--tasks-out", "two_tasks.h5", "--cache", "cache", cwd=root)
    assert list((root / "cache").glob("emb-*.h5"))
    assert (root / "one.csv").read_text() == (root / "two.csv").read_text()
    one, two = (json.loads((root / f).read_text()) for f in ("one.json", "two.json"))
    assert one["layers"] == two["layers"] and one["model_mean"] == two["model_mean"]
    ta, tb = datasets(root / "one_tasks.h5"), datasets(root / "two_tasks.h5")
    assert all(np.array_equal(ta[k], tb[k], equal_nan=True) for k in ta) and ta.keys() == tb.keys()
    # what a killed torchrun score leaves: the ranks' parts (killed before the merge), or tasks.h5 and mis.json
    # without mis.csv (killed during the merge); the same command replaces both and gives the same result
    torchrun_score = ["score", "dist_score.h5", "--layer", "all", "--similarity", "pixel", "--image-size", "16",
                      "--tasks", "10", "--bootstrap", "50", "--out", "three.csv", "--tasks-out", "three_tasks.h5"]
    for i in range(2):
        score(single, ["all"], settings, root / f"three.part{i}of2.csv", root / f"three_tasks.part{i}of2.h5",
              shard=(i, 2))
    torchrun(*torchrun_score, cwd=root)
    (root / "three.csv").unlink()
    torchrun(*torchrun_score, cwd=root)
    assert (root / "three.csv").read_text() == (root / "one.csv").read_text()
    assert not list(root.glob("three*.part*"))


TOPK = dict(layers=("conv1.bn", "inception3a.branch1.bn", "softmax"), resize=16, crop=16, batch_size=32)


def test_topk_extraction_equals_full_and_gives_identical_mis(setup, tmp_path, monkeypatch):
    root, folder = setup
    loaded = load_model(str(root / "model.pt"), arch="mini_inception", num_classes=3, arch_kwargs={"width": 8})
    base = TOPK
    full = extract(loaded, str(folder), tmp_path / "full.h5", ExtractSettings(**base))
    topk = extract(loaded, str(folder), tmp_path / "topk.h5", ExtractSettings(**base, keep="topk:200"))
    with h5py.File(full, "r") as f, h5py.File(topk, "r") as t:
        for layer in base["layers"]:
            acts = f[f"layers/{layer}/activations"][...]
            g = t[f"layers/{layer}"]
            assert "activations" not in g and g["top_value"].shape == (acts.shape[1], 200)
            for unit in range(acts.shape[1]):
                order = np.argsort(-acts[:, unit], kind="stable")
                np.testing.assert_array_equal(g["top_value"][unit], acts[order[:200], unit])
                np.testing.assert_array_equal(np.sort(g["bottom_value"][unit]), np.sort(acts[:, unit])[:200])
                np.testing.assert_array_equal(acts[g["top_index"][unit], unit], g["top_value"][unit])
            np.testing.assert_allclose(g["stats/mean"][...], acts.mean(0), rtol=1e-5, atol=1e-6)
    settings = ScoreSettings(similarity="pixel", image_size=16, device="cpu", n_boot=50)
    score(full, ["all"], settings, tmp_path / "f.csv")
    score(topk, ["all"], settings, tmp_path / "t.csv")
    assert (tmp_path / "f.csv").read_text() == (tmp_path / "t.csv").read_text()
    # the ranks' top-k states merge exactly (in this process; under torchrun in the -m slow test below)
    ranks_in_turn(monkeypatch, 2, lambda: extract(loaded, str(folder), tmp_path / "dtopk.h5",
                                                  ExtractSettings(**base, keep="topk:200")))
    _same_datasets(topk, tmp_path / "dtopk.h5", exact_sums=False)


@pytest.mark.slow
def test_torchrun_topk_extraction_equals_one_process(setup, tmp_path):
    root, folder = setup
    loaded = load_model(str(root / "model.pt"), arch="mini_inception", num_classes=3, arch_kwargs={"width": 8})
    topk = extract(loaded, str(folder), tmp_path / "topk.h5", ExtractSettings(**TOPK, keep="topk:200"))
    torchrun("extract", str(root / "model.pt"), "--arch", "mini_inception", "--num-classes", "3", "--arch-kwargs",
             '{"width": 8}', "--data", str(folder), "--layers", ",".join(TOPK["layers"]), "--resize", "16", "--crop",
             "16", "--batch-size", "32", "--keep", "topk:200", "--out", "dtopk.h5", cwd=tmp_path)
    _same_datasets(topk, tmp_path / "dtopk.h5", exact_sums=False)


def test_ddp_retraining_keeps_masks_and_matches_one_process(setup, tmp_path):
    """With augmentation: each image's random flips depend on (seed, step, epoch, image), not on the rank."""
    root, folder = setup
    torch.manual_seed(1)
    torch.save(build_arch("tiny_cnn", 3).state_dict(), tmp_path / "tiny.pt")
    args = ["tiny.pt", "--arch", "tiny_cnn", "--num-classes", "3", "--method", "connection", "--rate", "0.5",
            "--epochs", "3", "--data", str(folder), "--val-data", str(folder), "--batch-size", "450",
            "--lr", "0.01", "--device", "cpu", "--resize", "16", "--crop", "16"]
    from click.testing import CliRunner

    from misbench.cli.main import cli

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(cli, ["prune", *args, "--out", "one.pt"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    torchrun("prune", *args, "--out", "two.pt", cwd=tmp_path)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for name, mask in one["masks"].items():
        assert torch.equal(mask, two["masks"][name])
        assert (two["state_dict"][name][~mask] == 0).all()
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, atol=1e-4, rtol=1e-4)
    assert [h["epoch"] for h in two["training"]["history"]] == [0, 1, 2, 3]
    for h1, h2 in zip(one["training"]["history"], two["training"]["history"]):
        assert h1["val_top1"] == pytest.approx(h2["val_top1"])
        if h1["train_loss"] is not None:
            assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)


def test_process_group_waits_long_enough_for_rank_zero_merges(monkeypatch):
    import datetime

    import torch.distributed as dist

    from misbench.runtime import distributed

    seen, watched, store = [], [], object()
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.append(kw))
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)  # the group's store, once joined

    class Watchdog:  # records that each joined rank starts its watchdog on the group's store (no thread here)
        def __init__(self, *args):
            self.args = args

        def start(self):
            watched.append(self.args)

    monkeypatch.setattr(distributed, "Watchdog", Watchdog)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.ensure_initialized(torch.device("cpu"))
    monkeypatch.setenv("MISBENCH_DIST_TIMEOUT_MIN", "5")
    distributed.ensure_initialized(torch.device("cpu"))
    assert [s["backend"] for s in seen] == ["gloo", "gloo"] and watched == [(store, 1, 2), (store, 1, 2)]
    assert seen[0]["timeout"] == datetime.timedelta(hours=2) and seen[1]["timeout"] == datetime.timedelta(minutes=5)


# slow: two torchrun jobs and a resumed one (47 s); in the default suite a DDP retraining equals one process
# (test_ddp_retraining_keeps_masks_and_matches_one_process) and a killed one-process retraining resumes to the same
# checkpoint (test_faults' test_prune_killed_after_an_epoch_or_after_the_final_rename_resumes)
@pytest.mark.slow
def test_ddp_retraining_killed_after_an_epoch_resumes_to_the_same_checkpoint(setup, tmp_path):
    """The torchrun job is stopped as Slurm pre-empts one (SIGTERM to torchrun, which stops its ranks)
    once rank 0 has written the first epoch's checkpoint; the same command with --resume finishes
    with the weights and history of the uninterrupted run."""
    import signal
    import time

    root, folder = setup
    args = ["prune", root / "model.pt", "--arch", "mini_inception", "--num-classes", "3", "--arch-kwargs",
            '{"width": 8}', "--method", "unstructured", "--rate", "0.5", "--epochs", "2", "--data", folder,
            "--val-data", folder, "--batch-size", "4", "--device", "cpu", "--resize", "16", "--crop", "16"]
    torchrun(*args, "--out", "full.pt", cwd=tmp_path)
    job = subprocess.Popen(torchrun_command(*args, "--out", "cut.pt"), cwd=tmp_path,
                           env={**TORCHRUN_ENV, "TMPDIR": str(tmp_path)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "cut.pt.partial"
    deadline = time.monotonic() + 240
    while not partial.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    job.wait(timeout=120)
    assert partial.exists() and not (tmp_path / "cut.pt").exists(), "the job ended before it could be interrupted"
    assert torch.load(partial, weights_only=True)["resume"]["epoch"] == 1
    torchrun(*args, "--out", "cut.pt", "--resume", cwd=tmp_path)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut.pt", weights_only=True)
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert resumed["training"]["history"] == full["training"]["history"]


# slow: three torchrun jobs (21 s); in the default suite torchrun extraction equals one process
# (test_distributed_extraction_equals_one_process) and a one-process extraction stopped by a bad image resumes
# (test_faults' test_bad_image_advice_works)
@pytest.mark.slow
def test_distributed_extraction_stopped_by_a_bad_image_resumes_to_the_same_file(setup, tmp_path):
    """Rank 1 meets an unreadable image and the job stops; rank 0's part is complete, rank 1's is not.
    Once the image is fixed, the same command with --resume gives the file of an uninterrupted run."""
    root, folder = setup
    data = tmp_path / "images"
    shutil.copytree(folder, data)
    victim = sorted((data / "class_02").iterdir())[100]  # in rank 1's half of the rows
    original = victim.read_bytes()
    victim.write_bytes(b"not a png")
    common = [root / "model.pt", "--arch", "mini_inception", "--num-classes", "3", "--arch-kwargs", '{"width": 8}',
              "--data", data, "--layers", "conv,softmax", "--resize", "16", "--crop", "16", "--batch-size", "40",
              "--out", "dist.h5"]
    failed = torchrun("extract", *common, cwd=tmp_path, check=False)
    assert failed.returncode != 0 and victim.name in failed.stderr + failed.stdout
    assert not (tmp_path / "dist.h5").exists()
    parts = sorted(p.name for p in tmp_path.glob("dist.h5.partial.rank*"))
    assert parts == ["dist.h5.partial.rank0of2", "dist.h5.partial.rank1of2"]
    victim.write_bytes(original)
    torchrun("extract", *common, "--resume", cwd=tmp_path)
    loaded = load_model(str(root / "model.pt"), arch="mini_inception", num_classes=3, arch_kwargs={"width": 8})
    single = extract(loaded, str(data), tmp_path / "single.h5",
                     ExtractSettings(layers=("conv", "softmax"), resize=16, crop=16, batch_size=40))
    a, b = datasets(single), datasets(tmp_path / "dist.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("dist.h5.partial*"))
