"""Fault injection: every long command killed (SIGKILL, SIGTERM) at named points, including inside the
write-then-rename windows, then rerun and compared with an uninterrupted run; disk full; concurrent
studies; outputs that are inputs; hostile files and settings. The kills come from tests/faultrun.py,
which wraps a named function of an ordinary `misbench` process (the library has no hook of its own)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_checkpoint, make_image_folder, write_acts, write_study
from test_extract import _same_contents
from misbench.errors import MisbenchError

ROOT = Path(__file__).resolve().parents[1]
FAULTRUN = ROOT / "tests" / "faultrun.py"
EXTRACT = ["--layers", "conv,softmax", "--batch-size", "4"]
SCORE = ["--layer", "all", "--similarity", "pixel", "--image-size", "16", "--tasks", "3", "--explanations", "2",
         "--bootstrap", "20", "--chunk-units", "4"]


def misbench(args, cwd, fault=None, fsize=None, timeout=300):
    """Run `misbench ARGS` in a subprocess (through faultrun), optionally with a fault or a file-size limit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env.update(OMP_NUM_THREADS="1", **(fault or {}))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, str(FAULTRUN), "-q", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit if fsize else None)


def fault(at, sig="KILL", count=1, match="", when="after"):
    return {"FAULT_AT": at, "FAULT_SIGNAL": sig, "FAULT_COUNT": str(count), "FAULT_MATCH": match, "FAULT_WHEN": when}


def killed(run, sig):
    code = {"KILL": -signal.SIGKILL, "TERM": 130}[sig]
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr


def one_line_error(run, *words):
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def misbench_here(args, cwd) -> subprocess.CompletedProcess:
    """Run `misbench -q ARGS` in this process: the runs that are not themselves killed or limited need no
    process of their own, and each process costs seconds of imports."""
    import traceback

    from click.testing import CliRunner

    from misbench.cli.main import cli

    here, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(cwd)
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): CPU sums depend on the thread count
    try:
        result = CliRunner().invoke(cli, ["-q", *map(str, args)])
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    stderr = result.stderr
    if result.exc_info and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def cli_error(args, cwd, *words):
    """Run the CLI in this process (no start-up cost) and check it ends with one 'Error:' line."""
    return one_line_error(misbench_here(args, cwd), *words)


def no_temp_files(folder):
    left = [p for p in Path(folder).rglob(".*.tmp*")]
    assert not left, left


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, a checkpoint, and the outputs of uninterrupted runs to compare with."""
    from misbench.activations.extract import ExtractSettings, extract
    from misbench.models.loading import load_model

    root = tmp_path_factory.mktemp("faults")
    make_image_folder(root / "images", classes=3, per_class=8, size=16)
    make_checkpoint(root / "m.pt")
    extract(load_model(str(root / "m.pt")), str(root / "images"), root / "ref.h5",
            ExtractSettings(layers=("conv", "softmax"), batch_size=4))
    return root


def fresh(world, tmp_path):
    for name in ("images", "m.pt", "ref.h5"):
        target = tmp_path / name
        if (world / name).is_dir():
            shutil.copytree(world / name, target)
        else:
            shutil.copy(world / name, target)
    return tmp_path


# -- extract -------------------------------------------------------------------------------------------------------

EXTRACT_POINTS = {  # name: (function, count, when)
    "after-batch-commit": ("misbench.activations.store:ActivationWriter._commit", 2, "after"),
    "inside-batch-write": ("misbench.activations.store:ActivationWriter._commit", 3, "before"),
    "before-final-rename": ("os:replace", 1, "before"),
    "after-stats": ("misbench.activations.store:ActivationWriter.finish", 1, "after"),
}


@pytest.mark.parametrize("point,sig", [("after-batch-commit", "KILL"), ("inside-batch-write", "TERM"),
                                       pytest.param("after-batch-commit", "TERM", marks=pytest.mark.slow),
                                       pytest.param("inside-batch-write", "KILL", marks=pytest.mark.slow)])
def test_extract_killed_resumes_to_the_uninterrupted_file(world, tmp_path, point, sig):
    d = fresh(world, tmp_path)
    at, count, when = EXTRACT_POINTS[point]
    args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "acts.h5"]
    killed(misbench(args, d, fault(at, sig, count, when=when)), sig)
    assert not (d / "acts.h5").exists() and (d / "acts.h5.partial").exists()
    with h5py.File(d / "acts.h5.partial", "r") as h5:
        rows = int(h5.attrs["rows_written"])
    if sig == "TERM":  # stopped at a batch boundary: the batch being written when the signal came is committed
        assert rows == 4 * count
    run = misbench_here([*args, "--resume"], d)
    assert run.returncode == 0, run.stderr
    _same_contents(d / "ref.h5", d / "acts.h5")
    assert not (d / "acts.h5.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["KILL", "TERM"])
@pytest.mark.parametrize("point", ["before-final-rename", "after-stats"])
def test_extract_killed_near_the_end_resumes(world, tmp_path, point, sig):
    d = fresh(world, tmp_path)
    at, count, when = EXTRACT_POINTS[point]
    args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "acts.h5"]
    killed(misbench(args, d, fault(at, sig, count, when=when)), sig)
    assert misbench_here([*args, "--resume"], d).returncode == 0
    _same_contents(d / "ref.h5", d / "acts.h5")


def test_partial_of_an_older_misbench_killed_with_sigkill_resumes(world, tmp_path):
    """Older misbench wrote partials in HDF5's 'latest' format, whose open-for-writing flag survives SIGKILL."""
    d = fresh(world, tmp_path)
    script = (
        "import os, misbench.activations.store as s; s.LIBVER = 'latest'\n"
        "from misbench.cli.main import cli\n"
        "orig = s.ActivationWriter._commit\n"
        "def commit(self):\n    orig(self)\n    if self.rows >= 8: os.kill(os.getpid(), 9)\n"
        "s.ActivationWriter._commit = commit\n"
        f"cli(['extract', 'm.pt', '--data', 'images', {', '.join(map(repr, EXTRACT))}, '--out', 'acts.h5'])\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=d, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    with pytest.raises(OSError, match="consistency flags"):  # what --resume died of
        h5py.File(d / "acts.h5.partial", "r+")
    run = misbench_here(["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "acts.h5", "--resume"], d)
    assert run.returncode == 0, run.stderr
    _same_contents(d / "ref.h5", d / "acts.h5")


@pytest.mark.slow
def test_torn_partial_is_discarded_and_extracted_again(world, tmp_path):
    d = fresh(world, tmp_path)
    args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "acts.h5"]
    killed(misbench(args, d, fault("misbench.activations.store:ActivationWriter._commit", "KILL", 3)), "KILL")
    partial = d / "acts.h5.partial"
    data = bytearray(partial.read_bytes())
    data[2048:6144] = b"\xff" * 4096  # metadata and rows overwritten
    partial.write_bytes(bytes(data))
    run = misbench(["-v", *args, "--resume"], d)
    assert run.returncode == 0, run.stderr
    assert "starting again" in run.stderr
    _same_contents(d / "ref.h5", d / "acts.h5")


def test_extract_resume_refuses_a_folder_with_added_images(world, tmp_path):
    d = fresh(world, tmp_path)
    args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "acts.h5"]
    killed(misbench(args, d, fault("misbench.activations.store:ActivationWriter._commit", "TERM", 2)), "TERM")
    shutil.copy(d / "images" / "class_02" / "img_000.png", d / "images" / "class_02" / "img_100.png")
    line = one_line_error(misbench_here([*args, "--resume"], d), "cannot resume", "n_dataset was 24, now 25",
                          "data_fingerprint")
    assert "--overwrite" in line


def test_bad_image_advice_works(world, tmp_path):
    from misbench.activations.extract import ExtractSettings, extract
    from misbench.models.loading import load_model

    d = fresh(world, tmp_path)
    (d / "images" / "class_01" / "img_005.png").write_bytes(b"not a png")
    args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "acts.h5"]
    line = one_line_error(misbench_here(args, d), "class_01/img_005.png", "--on-bad-image skip --resume")
    assert misbench_here([*args, "--on-bad-image", "skip", "--resume"], d).returncode == 0
    extract(load_model(str(d / "m.pt")), str(d / "images"), d / "skip.h5",
            ExtractSettings(layers=("conv", "softmax"), batch_size=4, on_bad_image="skip"))
    _same_contents(d / "skip.h5", d / "acts.h5")
    with h5py.File(d / "acts.h5", "r") as h5:
        assert json.loads(h5.attrs["skipped_paths"]) == ["class_01/img_005.png"]
        assert json.loads(h5.attrs["settings"])["on_bad_image"] == "skip"
    assert line


# -- disk full -----------------------------------------------------------------------------------------------------

def test_extract_disk_full_is_one_line_and_resumable(world, tmp_path):
    d = fresh(world, tmp_path)
    args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "acts.h5"]
    run = misbench(args, d, fsize=(d / "ref.h5").stat().st_size // 2)
    one_line_error(run, "acts.h5.partial", "--resume")
    assert misbench_here([*args, "--resume"], d).returncode == 0
    _same_contents(d / "ref.h5", d / "acts.h5")


def test_score_disk_full_is_one_line_and_leaves_no_half_result(world, tmp_path):
    d = fresh(world, tmp_path)
    args = ["score", "ref.h5", *SCORE, "--out", "mis.csv", "--tasks-out", "tasks.h5", "--cache", "cache"]
    one_line_error(misbench(args, d, fsize=2048), "cannot write")
    assert not (d / "mis.csv").exists() and not (d / "mis.json").exists()
    no_temp_files(d)
    assert misbench_here(args, d).returncode == 0
    assert (d / "tasks.h5").exists()


def _mount_tmpfs(path, size="256k"):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a tmpfs needs root")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "score"])
def test_full_tmpfs_is_one_line(world, tmp_path, command):
    d = fresh(world, tmp_path)
    small = d / "small"
    _mount_tmpfs(small, "96k")
    try:
        if command == "extract":
            args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", small / "acts.h5"]
        else:
            args = ["score", "ref.h5", *SCORE, "--out", small / "mis.csv", "--tasks-out", small / "tasks.h5",
                    "--cache", small / "cache"]
        run = misbench(args, d)
        one_line_error(run, "cannot write", str(small))
        no_temp_files(small)
        assert not (small / "mis.csv").exists() and not (small / "acts.h5").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)


# -- score ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache,sig", [(True, "KILL"), pytest.param(True, "TERM", marks=pytest.mark.slow),
                                       pytest.param(False, "KILL", marks=pytest.mark.slow),
                                       pytest.param(False, "TERM", marks=pytest.mark.slow)])
def test_score_killed_in_its_write_windows_then_rerun_is_identical(world, tmp_path, cache, sig):
    d = fresh(world, tmp_path)
    extra = ["--cache", "cache"] if cache else []
    ref = misbench_here(["score", "ref.h5", *SCORE, "--out", "ref/mis.csv", "--tasks-out", "ref/tasks.h5",
                    *(["--cache", "refcache"] if cache else [])], d)
    assert ref.returncode == 0, ref.stderr
    args = ["score", "ref.h5", *SCORE, "--out", "mis.csv", "--tasks-out", "tasks.h5", *extra]
    points = [("misbench.runtime.fileio:write_hdf5", 1, "cache")] if cache else []  # first: later runs find it cached
    points += [("misbench.runtime.fileio:write_hdf5", 1, "tasks.h5"), ("os:replace", 1, "mis.json")]
    for at, count, match in points:
        killed(misbench(args, d, fault(at, sig, count, match)), sig)
        assert not (d / "mis.csv").exists()  # mis.csv comes last: never without its tasks and mis.json
    run = misbench_here(args, d)
    assert run.returncode == 0, run.stderr
    assert (d / "mis.csv").read_text() == (d / "ref" / "mis.csv").read_text()
    with h5py.File(d / "tasks.h5", "r") as a, h5py.File(d / "ref" / "tasks.h5", "r") as b:
        for layer in b:
            for key in b[layer]:
                np.testing.assert_array_equal(a[layer][key][...], b[layer][key][...])
    no_temp_files(d)


def test_temp_files_of_killed_runs_are_removed_by_the_next_run(world, tmp_path):
    d = fresh(world, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = d / f".mis.csv.tmp{int(dead.stdout)}"
    stale.write_text("half a file")
    assert misbench_here(["score", "ref.h5", *SCORE, "--out", "mis.csv"], d).returncode == 0
    assert not stale.exists()


# -- prune / retrain -----------------------------------------------------------------------------------------------

def _same_checkpoint(a, b):
    from misbench.models.checkpoint import load_checkpoint_dict

    ca, cb = load_checkpoint_dict(a), load_checkpoint_dict(b)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k
    for k in ca["masks"]:
        assert torch.equal(ca["masks"][k], cb["masks"][k]), k
    assert ca["training"]["history"] == cb["training"]["history"]
    assert ca["pruning"] == cb["pruning"]


PRUNE = ["prune", "m.pt", "--method", "structured", "--rate", "0.5", "--epochs", "2", "--data", "images",
         "--batch-size", "8", "--seed", "0"]


@pytest.mark.parametrize("sig", ["KILL", pytest.param("TERM", marks=pytest.mark.slow)])
def test_prune_killed_after_an_epoch_or_after_the_final_rename_resumes(world, tmp_path, sig):
    d = fresh(world, tmp_path)
    assert misbench_here([*PRUNE, "--out", "ref.pt"], d).returncode == 0
    # after the first epoch's checkpoint, then after the final rename (before the .partial is removed)
    killed(misbench([*PRUNE, "--out", "model.pt"], d, fault("os:replace", sig, 1, "model.pt.partial")), sig)
    assert (d / "model.pt.partial").exists() and not (d / "model.pt").exists()
    killed(misbench([*PRUNE, "--out", "model.pt", "--resume"], d, fault("os:replace", sig, 2, "model.pt")), sig)
    assert (d / "model.pt").exists()
    if sig == "KILL":
        assert (d / "model.pt.partial").exists()  # the window: both files there
        run = misbench_here([*PRUNE, "--out", "model.pt", "--resume"], d)
        assert run.returncode == 0, run.stderr
    # SIGTERM waits for the .partial's removal: the run is complete when it stops
    assert not (d / "model.pt.partial").exists()
    _same_checkpoint(d / "ref.pt", d / "model.pt")


def test_prune_resume_with_other_settings_lists_the_differences(world, tmp_path):
    d = fresh(world, tmp_path)
    killed(misbench([*PRUNE, "--out", "model.pt"], d, fault("os:replace", "KILL", 1, "model.pt.partial")), "KILL")
    changed = [a if a != "0.5" else "0.25" for a in PRUNE]
    changed[changed.index("--seed")] = "--lr"
    changed[changed.index("0")] = "0.05"
    line = one_line_error(misbench_here([*changed, "--out", "model.pt", "--resume"], d), "cannot resume",
                          "pruning.rate was 0.5, now 0.25", "training.lr was 0.01, now 0.05")
    assert "--overwrite" in line


def test_partial_checkpoint_is_never_accepted_as_a_model(world, tmp_path):
    from misbench.models.loading import load_model

    d = fresh(world, tmp_path)
    ckpt = torch.load(d / "m.pt", weights_only=True)
    torch.save({**ckpt, "resume": {"step": 1, "epoch": 1, "trainer": None}}, d / "model.pt.partial")
    shutil.copy(d / "model.pt.partial", d / "renamed.pt")
    torch.save(ckpt, d / "finished.pt.partial")
    for spec in ("model.pt.partial", "renamed.pt", "finished.pt.partial"):
        with pytest.raises(MisbenchError, match="unfinished run"):
            load_model(str(d / spec))


# -- study ---------------------------------------------------------------------------------------------------------

def study_config(d, epochs=1, methods=("structured",)):
    return write_study(d / "study.toml", study={"name": "faults"}, model={"spec": d / "m.pt"},
                       data={"train": d / "images", "val": d / "images"}, retrain={"epochs": epochs},
                       pruning={"methods": list(methods)})


def done_steps(out):
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    return {name for name, e in steps.items() if e["status"] == "done"}


@pytest.mark.parametrize("at,match", [("misbench.activations.store:ActivationWriter._commit", ""),  # inside an extract step
                                      pytest.param("os:replace", "model.pt", marks=pytest.mark.slow)])  # a checkpoint renamed, its .partial not removed
def test_killed_study_continues_from_what_is_complete(world, tmp_path, at, match):
    d = fresh(world, tmp_path)
    # only the checkpoint window needs a pruned network and an epoch (its .partial)
    config = study_config(d, epochs=1 if match else 0, methods=("structured",) if match else ())
    count = 2 if match else 3
    killed(misbench(["study", config, "--out", "out"], d, fault(at, "KILL", count, match)), "KILL")
    before = done_steps(d / "out")
    run = misbench_here(["study", config, "--out", "out"], d)
    assert run.returncode == 0, run.stderr
    steps = json.loads((d / "out" / "manifest.json").read_text())["steps"]
    assert all(e["status"] == "done" for e in steps.values())
    assert "cached" in run.stderr or before == set()
    assert not list((d / "out").rglob("*.partial"))
    from misbench.activations.store import open_activations

    for acts in (d / "out" / "runs").rglob("acts.h5"):
        open_activations(acts).close()


def test_second_study_on_one_directory_names_the_holder(world, tmp_path):
    d = fresh(world, tmp_path)
    config = study_config(d, epochs=0, methods=())  # the base network's four steps: the holder finishes sooner
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env.update(fault("misbench.studies.manifest:Manifest.save", "STOP", 1))
    first = subprocess.Popen([sys.executable, str(FAULTRUN), "-q", "study", str(config), "--out", "out"], cwd=d,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # stopped (SIGSTOP) while holding the lock
            with open(f"/proc/{first.pid}/stat") as f:
                if f.read().split(")")[1].split()[0] == "T":
                    break
            time.sleep(0.2)
        second = misbench_here(["study", config, "--out", "out"], d)
        one_line_error(second, "in use by another misbench study", f"pid {first.pid}", "host")
    finally:
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=300)
    assert first.returncode == 0
    assert all(e["status"] == "done" for e in json.loads((d / "out" / "manifest.json").read_text())["steps"].values())


def test_study_step_whose_output_fails_verification_is_not_done(world, tmp_path, monkeypatch):
    from misbench.studies.run import Study  # (misbench.study, the package attribute, is the API function)
    from misbench.studies.config import load_config

    d = fresh(world, tmp_path)
    config = load_config(study_config(d, epochs=0))

    def broken_extract(self, ckpt, out, resume):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)

    monkeypatch.setattr(Study, "_extract", broken_extract)
    with pytest.raises(MisbenchError, match="not a readable HDF5"):
        Study(config, d / "out").run()
    steps = json.loads((d / "out" / "manifest.json").read_text())["steps"]
    assert steps["extract:base"]["status"] == "failed"


def test_study_reruns_steps_when_the_spec_file_changes(world, tmp_path):
    from misbench.studies.run import Study
    from misbench.studies.config import load_config

    d = fresh(world, tmp_path)
    config = load_config(study_config(d, epochs=0))
    Study(config, d / "out").run()
    assert all(status == "cached" for _, status in Study(config, d / "out").plan())
    make_checkpoint(d / "m.pt", seed=1)  # same path, other weights
    plan = dict(Study(config, d / "out").plan())
    assert plan["prune:structured-l1-0.5-oneshot"] == "run" and plan["eval:base"] == "run"


# -- outputs that are inputs ---------------------------------------------------------------------------------------

def _import_pickle(path):
    import pandas as pd

    frame = pd.DataFrame({"layer": ["a", "a"], "unit": [0, 1], "mis": [0.5, 0.6], "mis_confidence": [0.5, 0.7],
                          "layer_type": ["Conv2d", "Conv2d"]})
    import pickle

    path.write_bytes(pickle.dumps({"scores": frame, "layer_types": {"a": "Conv2d"}}))
    return path


@pytest.mark.parametrize("args,words", [
    (["score", "ref.h5", *SCORE, "--out", "ref.h5"], ["--out", "input ACTS"]),
    (["score", "ref.h5", *SCORE, "--out", "m.csv", "--tasks-out", "ref.h5"], ["--tasks-out", "input ACTS"]),
    (["score", "ref.h5", *SCORE, "--out", "x.csv", "--tasks-out", "x.csv"], ["--tasks-out", "output --out"]),
    (["eval", "--acts", "ref.h5", "--out", "ref.h5"], ["--out", "input --acts"]),
    (["eval", "--acts", "ref.h5", "--out", "e.json", "--classwise", "e.json"], ["--classwise", "output --out"]),
    (["import-scores", "x.pkl", "--out", "x.pkl"], ["--out", "input PICKLE_FILE"]),
    (["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "m.pt", "--overwrite"], ["--out", "input MODEL"]),
    (["prune", "m.pt", "--method", "structured", "--rate", "0.5", "--out", "m.pt", "--overwrite"],
     ["--out", "input MODEL"]),
])
def test_output_that_is_an_input_is_refused_before_any_work(world, tmp_path, args, words):
    from click.testing import CliRunner

    from misbench.cli.main import cli
    from misbench.runtime.fileio import sha256_file

    d = fresh(world, tmp_path)
    _import_pickle(d / "x.pkl")
    before = {p: sha256_file(d / p) for p in ("ref.h5", "m.pt", "x.pkl")}
    cwd = os.getcwd()
    os.chdir(d)
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 1, result.output
    for word in words:
        assert word in result.output
    assert {p: sha256_file(d / p) for p in before} == before
    assert not (d / "e.json").exists() and not (d / "x.csv").exists() and not (d / "m.csv").exists()


# -- hostile files and settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [2, 0, None, 1.5])
def test_other_schema_versions_are_refused(image_folder, tmp_path, version):
    from misbench.activations.store import open_activations

    path = write_acts(tmp_path / "a.h5", image_folder, {"l": np.zeros((24, 2))})
    with h5py.File(path, "r+") as h5:
        if version is None:
            del h5.attrs["schema_version"]
        else:
            h5.attrs["schema_version"] = version
    with pytest.raises(MisbenchError, match=f"schema_version {version!r}.*reads schema_version 1"):
        open_activations(path)


@pytest.mark.parametrize("missing", ["images/index", "outputs/logits"])
def test_activation_file_missing_a_dataset_is_refused(image_folder, tmp_path, missing):
    from misbench.activations.store import open_activations

    path = write_acts(tmp_path / "a.h5", image_folder, {"l": np.zeros((24, 2))})
    with h5py.File(path, "r+") as h5:
        del h5[missing]
    with pytest.raises(MisbenchError, match=f"has no {missing}"):
        open_activations(path)


@pytest.mark.parametrize("alpha", ["nan", "inf", "-1", "0"])
def test_alpha_must_be_positive_and_finite(alpha):
    from misbench.scoring.run import ScoreSettings

    with pytest.raises(MisbenchError, match="expected a finite positive sigmoid slope"):
        ScoreSettings(alpha=float(alpha))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from misbench.datasets.sources import FolderSource

    (tmp_path / "c").mkdir()
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "c" / "a.png")
    assert Image.open(tmp_path / "c" / "a.png").mode.startswith("I")
    got = np.asarray(FolderSource(str(tmp_path), tmp_path).image(0))
    expected = np.round(values / 257.0).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], expected)


@pytest.mark.parametrize("key,value,words", [
    ("epochs", '"1"', ["[retrain] epochs", "expected an integer"]),
    ("rates", "0.5", ["[pruning] rates", "expected a list"]),
    ("seed", '"zero"', ["[study] seed", "expected an integer"]),
    ("batch_size", "0", ["[retrain] batch_size", "at least 1"]),
    ("tasks", "0", ["[score] tasks", "at least 1"]),
    ("image_size", "8", ["[score] image_size", "at least 16"]),
])
def test_config_values_of_the_wrong_type_name_the_key(key, value, words):
    import tomllib

    from misbench.studies.config import parse_config

    section = {"epochs": "retrain", "rates": "pruning", "seed": "study", "batch_size": "retrain", "tasks": "score",
               "image_size": "score"}[key]
    given = {"model": {"spec": "resnet18"}, "data": {"val": "x", "train": "x"}}
    given.setdefault(section, {})[key] = tomllib.loads(f"v = {value}")["v"]
    with pytest.raises(MisbenchError) as err:
        parse_config(given)
    for word in words:
        assert word in str(err.value)


def test_corrupt_manifest_is_a_clear_error(world, tmp_path):
    d = fresh(world, tmp_path)
    (d / "out").mkdir()
    (d / "out" / "manifest.json").write_text('{"steps": {"a": ')
    cli_error(["study", study_config(d, 0), "--out", "out"], d, "manifest.json is damaged")


@pytest.mark.parametrize("damage", ["arch", "state_dict", "mask"])
def test_damaged_checkpoints_are_one_line_errors(world, tmp_path, damage):
    d = fresh(world, tmp_path)
    ckpt = torch.load(d / "m.pt", weights_only=True)
    if damage == "arch":
        ckpt["arch"] = "no_such_net"
    elif damage == "state_dict":
        del ckpt["state_dict"]
    else:
        ckpt["masks"] = {"conv1.conv.weight": torch.ones(3, 3, dtype=torch.bool)}
    torch.save(ckpt, d / "bad.pt")
    cli_error(["audit", "bad.pt"], d, "bad.pt" if damage != "arch" else "no_such_net")


@pytest.mark.parametrize("args", [
    ["retrain", "m.pt", "--epochs", "1", "--data", "images", "--batch-size", "0", "--out", "r.pt"],
    ["score", "ref.h5", *SCORE, "--bootstrap", "-5", "--out", "s.csv"],
    ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "ref.h5/x.h5"],  # a file as the folder
])
def test_bad_options_and_unwritable_outputs_are_one_line_errors(world, tmp_path, args):
    d = fresh(world, tmp_path)
    cli_error(args, d)
