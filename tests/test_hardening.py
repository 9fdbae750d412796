"""Hardened inputs (issue 19): concurrent writers, outputs that are inputs (sidecars included), shard parts that
are not their shard's, reserved layer names, diverged or invalid dictionaries."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_image_folder, write_acts
from test_extract import _same_contents
from test_faults import EXTRACT, FAULTRUN, cli_error, fault, fresh, world  # noqa: F401 (world: a fixture)
from misbench.cli.main import cli
from misbench.runtime.fileio import sha256_file


def _stopped(pid: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[1].split()[0] == "T":
                return
        time.sleep(0.1)
    raise AssertionError("the first writer never reached its stop point")


@pytest.mark.parametrize("second", [["--resume"], pytest.param(["--overwrite"], marks=pytest.mark.slow),
                                    pytest.param([], marks=pytest.mark.slow)])
def test_second_writer_of_a_live_extraction_is_refused_naming_its_pid(world, tmp_path, second):
    d = fresh(world, tmp_path)
    args = ["extract", "m.pt", "--data", "images", *EXTRACT, "--out", "a.h5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env.update(OMP_NUM_THREADS="1", **fault("misbench.activations.store:ActivationWriter._commit", "STOP", 1))
    first = subprocess.Popen([sys.executable, str(FAULTRUN), "-q", *args], cwd=d, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _stopped(first.pid)  # one batch committed to a.h5.partial, the lock held
        partial = (d / "a.h5.partial").read_bytes()
        # the second writer: this test's own process (a second process start costs seconds)
        line = cli_error([*args, *second], d, "a.h5 is in use by another misbench extract", f"pid {first.pid}")
        assert "damaged" not in line and "interrupted" not in line
        assert (d / "a.h5.partial").read_bytes() == partial  # the live partial was not touched
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _same_contents(d / "a.h5", d / "ref.h5")
    assert not list(d.glob(".*.lock*"))  # the lock file goes with its holder


def test_lock_is_taken_again_after_its_holder_was_killed(tmp_path):
    from misbench.errors import MisbenchError
    from misbench.runtime.lock import OutputLock, lock_outputs

    target = tmp_path / "x.csv"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from misbench.runtime.lock import OutputLock\n"
        f"lock = OutputLock({str(target)!r}, 'test holder').__enter__(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MisbenchError, match=f"x.csv is in use by another test holder \\(pid {holder.pid} on host"):
            with OutputLock(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    with lock_outputs([target, target]):  # the kernel released the dead holder's lock; one path locked once
        with lock_outputs([target]):      # a writer called by another in one process (score -> merge)
            pass


def test_train_dictionary_refuses_its_own_input_as_output(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=4, size=4)
    acts = write_acts(tmp_path / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(8, 6))})
    before = sha256_file(acts)
    res = CliRunner().invoke(cli, ["train-dictionary", str(acts), "--layer", "l", "--n-features", "4", "--k", "1",
                                   "--steps", "2", "--out", str(acts), "--overwrite"])
    assert res.exit_code == 1 and "--out" in res.output and "input ACTS" in res.output, res.output
    assert sha256_file(acts) == before


@pytest.fixture
def shards(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=6, size=4)
    rng = np.random.default_rng(0)
    acts = write_acts(tmp_path / "acts.h5", folder, {"a": rng.normal(size=(12, 5)), "b": rng.normal(size=(12, 4))})
    score = ["score", str(acts), "--layer", "all", "--similarity", "pixel", "--image-size", "16", "--selection",
             "quantile", "--quantile", "0.5", "--tasks", "2", "--explanations", "2", "--bootstrap", "10"]
    for i in (0, 1):
        res = CliRunner().invoke(cli, [*score, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}.csv"),
                                       "--tasks-out", str(tmp_path / f"s{i}_t.h5")])
        assert res.exit_code == 0, res.output
    return tmp_path


def test_merge_scores_of_the_api_equals_the_command(shards):
    import misbench

    parts = [str(shards / "s0.csv"), str(shards / "s1.csv")]
    res = CliRunner().invoke(cli, ["merge-scores", *parts, "--out", str(shards / "cli.csv")])
    assert res.exit_code == 0, res.output
    merged = misbench.merge_scores(parts, shards / "api.csv")
    assert (shards / "api.csv").read_bytes() == (shards / "cli.csv").read_bytes()
    assert merged.equals(misbench.load_scores(shards / "cli.csv")) and len(merged) == 9
    with pytest.raises(misbench.errors.MisbenchError, match="out: .* already exists"):
        misbench.merge_scores(parts, shards / "api.csv")


def test_merge_scores_refuses_a_parts_tasks_file_as_tasks_out(shards):
    before = sha256_file(shards / "s0_t.h5")
    res = CliRunner().invoke(cli, ["merge-scores", str(shards / "s0.csv"), str(shards / "s1.csv"), "--out",
                                   str(shards / "m.csv"), "--tasks-out", str(shards / "s0_t.h5"), "--overwrite"])
    assert res.exit_code == 1 and "--tasks-out" in res.output and "tasks file" in res.output, res.output
    assert sha256_file(shards / "s0_t.h5") == before and not (shards / "m.csv").exists()


def test_merge_scores_refuses_a_part_copied_over_another(shards):
    import shutil

    shutil.copy(shards / "s0.csv", shards / "s1.csv")  # s1.json still says shard 1/2
    res = CliRunner().invoke(cli, ["merge-scores", str(shards / "s0.csv"), str(shards / "s1.csv"), "--out",
                                   str(shards / "m.csv")])
    assert res.exit_code == 1 and "twice" in res.output, res.output
    assert not (shards / "m.csv").exists()


def test_merge_scores_refuses_a_part_holding_another_shards_units(shards):
    rows = (shards / "s1.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    # swap which shard holds layer a's unit 0 and unit 1: every unit still once, each in the wrong part
    zero = (shards / "s0.csv").read_text().splitlines()
    a0 = next(r for r in zero[1:] if r.startswith("a,0,"))
    a1 = next(r for r in body if r.startswith("a,1,"))
    (shards / "s0.csv").write_text("\n".join([zero[0], *[a1 if r == a0 else r for r in zero[1:]]]) + "\n")
    (shards / "s1.csv").write_text("\n".join([header, *[a0 if r == a1 else r for r in body]]) + "\n")
    res = CliRunner().invoke(cli, ["merge-scores", str(shards / "s0.csv"), str(shards / "s1.csv"), "--out",
                                   str(shards / "m.csv")])
    assert res.exit_code == 1 and "unit a:1, which belongs to shard 1/2" in res.output, res.output


def _dictionary(path, **tensors):
    obj = {"W_enc": torch.randn(3, 4), "b_enc": torch.zeros(3), **tensors}
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name", ["softmax", "logits", "conv", "all"])
def test_feature_layers_may_not_take_reserved_names(world, tmp_path, name):
    from misbench.activations.dictionary import resolve_features

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    file = _dictionary(tmp_path / "d.pt")
    with pytest.raises(Exception, match=f"'{name}' is a reserved layer name"):
        resolve_features(model, [f"{name}=1:{file}"], [], torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("tensors,words", [
    ({"W_enc": torch.zeros(0, 4), "b_enc": torch.zeros(0)}, "at least one feature"),
    ({"W_enc": torch.randn(3, 4, dtype=torch.complex64)}, "complex64; a dictionary holds real"),
    ({"b_enc": torch.tensor([0.0, float("nan"), 0.0])}, "b_enc holds non-finite values"),
])
def test_invalid_dictionaries_are_one_line_errors(tmp_path, tensors, words):
    from misbench.activations.dictionary import load_dictionary
    from misbench.errors import MisbenchError

    with pytest.raises(MisbenchError, match=words):
        load_dictionary(_dictionary(tmp_path / "d.pt", **tensors))


@pytest.mark.parametrize("lr,words", [("1e30", "diverged"), ("nan", "--lr must be a positive finite"),
                                      ("-1", "--lr must be a positive finite"), ("inf", "--lr must be")])
def test_train_dictionary_refuses_non_finite_training(tmp_path, lr, words):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=10, size=4)
    acts = write_acts(tmp_path / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(20, 6))})
    res = CliRunner().invoke(cli, ["train-dictionary", str(acts), "--layer", "l", "--n-features", "4", "--k", "2",
                                   "--steps", "20", "--lr", lr, "--out", str(tmp_path / "d.pt")])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and words in lines[0], res.output
    assert not (tmp_path / "d.pt").exists()


# -- image folders: links, flat folders, folder-order ------------------------------------------------------------

def test_directory_links_never_relabel_images_or_loop(tmp_path, caplog):
    from misbench.datasets.sources import FolderSource

    root = make_image_folder(tmp_path / "images", classes=3, per_class=4, size=8)
    outside = make_image_folder(tmp_path / "extra", classes=1, per_class=2, size=8) / "class_00"
    (root / "class_00" / "loop").symlink_to("..")                       # the root again: every class, as class 0
    (root / "class_01" / "twin").symlink_to(root / "class_02")          # another class's folder
    (root / "class_02" / "self").symlink_to(".")                        # itself: a loop
    (root / "class_01" / "more").symlink_to(outside)                    # outside the data: followed once
    (root / "class_02" / "more").symlink_to(outside)                    # ... not twice
    source = FolderSource(str(root), root)
    # the reference: every path's label is its first folder's index, each real image once per class
    expected = sorted([(f"class_{c:02d}/img_{i:03d}.png", c) for c in range(3) for i in range(4)]
                      + [(f"class_01/more/img_{i:03d}.png", 1) for i in range(2)])
    got = sorted((source.path(i), source.label(i)) for i in range(len(source)))
    assert got == expected
    assert all(int(p.split("/")[0][-2:]) == label for p, label in got)
    assert "loop links to" in caplog.text and "twin links to" in caplog.text


def test_plain_folders_list_like_torchvision(tmp_path):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    from misbench.datasets.folders import IMAGE_EXTENSIONS, scan_folder

    root = make_image_folder(tmp_path / "images", classes=3, per_class=3, size=8)
    (root / "class_01" / "sub b").mkdir()
    (root / "class_01" / "sub").mkdir()
    for name in ("class_01/sub/z.png", "class_01/sub b/a.png", "class_01/A.JPG", "class_02/notes.txt"):
        (root / name).write_bytes(b"x")
    folders, samples = scan_folder(root)
    classes, index = find_classes(str(root))
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS and folders == classes
    assert [(str(root / p), c) for p, c in samples] == make_dataset(str(root), index, IMG_EXTENSIONS)


def test_flat_folder_is_unlabelled_and_class_reports_refuse_it(tmp_path):
    from misbench.activations.evaluate import accuracy_from_logits
    from misbench.datasets.sources import load_data
    from misbench.errors import MisbenchError

    root = make_image_folder(tmp_path / "x", classes=1, per_class=5, size=8) / "class_00"
    source = load_data(str(root), num_classes=10)
    assert len(source) == 5 and [source.label(i) for i in range(5)] == [-1] * 5
    assert source.label_map.mapping == "unlabelled"
    with pytest.raises(MisbenchError, match="unlabelled .* need one sub-folder of images per class; MIS"):
        accuracy_from_logits(np.zeros((5, 10)), [source.label(i) for i in range(5)])


def test_folder_order_onto_more_classes_warns(tmp_path, caplog):
    from misbench.activations.evaluate import evaluate_model
    from misbench.datasets.labels import folder_labels
    from misbench.models.loading import load_model

    m = folder_labels(["bag", "cat"], 1000, "folder-order", "d", [f"c{i}" for i in range(1000)])
    assert m.indices == (0, 1) and "2 class folders for a model with 1000 classes" in m.warning
    assert "folder 'bag' as class 0 'c0'" in m.warning and "folder 'bag'" in caplog.text
    assert folder_labels(["a", "b"], 2, "folder-order").warning == ""
    root = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=16)
    from test_faults import make_checkpoint

    loaded = load_model(str(make_checkpoint(tmp_path / "m.pt")))  # 3 classes, 2 folders
    result = evaluate_model(loaded, str(root))
    assert "2 class folders for a model with 3 classes" in result["label_warning"]


# -- weight files -----------------------------------------------------------------------------------------------

STAGED = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def hub_copy(tmp_path, monkeypatch):
    """A TORCH_HOME of our own holding a copy of the staged mobilenet_v2 weights (the real file is never touched)."""
    import shutil

    staged = next((d / "hub" / "checkpoints" / STAGED for d in (
        __import__("pathlib").Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser(),
        __import__("pathlib").Path("~/.cache/torch").expanduser()) if (d / "hub" / "checkpoints" / STAGED).exists()),
        None)
    if staged is None:
        pytest.skip(f"{STAGED} is not staged (make assets)")
    home = tmp_path / "torch"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    copy = home / "hub" / "checkpoints" / STAGED
    shutil.copy(staged, copy)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return copy


def test_damaged_or_substituted_hub_weights_are_refused_naming_the_file(hub_copy):
    from misbench.errors import MisbenchError
    from misbench.models.loading import read_hub_weights, torchvision_weights

    url = torchvision_weights("mobilenet_v2", "IMAGENET1K_V1").url
    assert hub_copy.name == os.path.basename(url)
    state = read_hub_weights(url)  # the intact copy: its sha256 starts as its name says
    assert str(hub_copy).startswith(os.environ["TORCH_HOME"])
    middle = hub_copy.stat().st_size // 2
    with open(hub_copy, "r+b") as handle:  # 4 KiB overwritten in the middle
        handle.seek(middle)
        handle.write(b"\xff" * 4096)
    with pytest.raises(MisbenchError, match=f"{hub_copy}.*sha256 starts .* the name says b0353104"):
        read_hub_weights(url)
    # another model's valid weights under the official name
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, hub_copy)
    with pytest.raises(MisbenchError, match="not the file its name promises"):
        read_hub_weights(url)


def test_non_finite_weights_are_refused_naming_the_file_and_tensor(tmp_path):
    from misbench.errors import MisbenchError
    from misbench.models.loading import load_model
    from test_faults import make_checkpoint

    ckpt = torch.load(make_checkpoint(tmp_path / "m.pt"), weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 4)
    ckpt["state_dict"][name].view(-1)[3] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(MisbenchError, match=f"nan.pt: {name} holds 1 non-finite value"):
        load_model(str(tmp_path / "nan.pt"))
    torch.save(ckpt["state_dict"], tmp_path / "sd.pt")
    with pytest.raises(MisbenchError, match=f"sd.pt: {name} holds 1 non-finite"):
        load_model(str(tmp_path / "sd.pt"), arch="mini_inception", num_classes=3, arch_kwargs={"width": 8})


def test_non_finite_embeddings_stop_the_score(tmp_path):
    from misbench.errors import MisbenchError
    from misbench.scoring.run import ScoreSettings, score
    from misbench.similarity.pixel import PixelBackend

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=6, size=16)
    acts = write_acts(tmp_path / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(12, 2))})

    class Broken(PixelBackend):
        def embed(self, x):
            out = super().embed(x)
            out[-1, 0] = float("nan")
            return out

    settings = ScoreSettings(similarity="pixel", image_size=16, selection="quantile", quantile=0.5, tasks=2,
                             explanations=2, n_boot=10)
    with pytest.raises(MisbenchError, match="pixel gave a non-finite embedding"):
        score(acts, ["l"], settings, backend=Broken(image_size=16))


# -- orphaned torchrun ranks ------------------------------------------------------------------------------------

WATCHDOG = """
import signal, sys, threading, time
from misbench.runtime.distributed import Watchdog

class Store(dict):  # torchrun's store, as the watchdog uses it
    def set(self, key, value): self[key] = value.encode()
    def get(self, key): return self[key]
    def check(self, keys): return all(k in self for k in keys)

store, mode = Store(), sys.argv[1]
def peer():  # rank 0 beats until 'dead'
    n = 0
    while mode != "dead" or n < 3:
        n += 1; store.set("misbench/beat/0", str(n)); time.sleep(0.2)
threading.Thread(target=peer, daemon=True).start()
signal.signal(signal.SIGTERM, lambda *a: None)  # a handler that only sets a flag, as inside a commit
Watchdog(store, 1, 2, peer_timeout=1.5, grace=1.0).start()
print("ready", flush=True)
time.sleep(60)  # the main thread 'blocked in a collective'
"""


@pytest.mark.parametrize("mode,signals,code,words", [
    ("dead", 0, 1, "rank 0 has not answered"), ("alive", 1, 143, "SIGTERM not acted on within 1 s"),
    ("alive", 2, 143, "second SIGTERM")])
def test_watchdog_ends_an_orphaned_or_terminated_rank_promptly(mode, signals, code, words):
    proc = subprocess.Popen([sys.executable, "-c", WATCHDOG, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        start = time.monotonic()
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    took = time.monotonic() - start
    assert proc.returncode == code and words in err, (proc.returncode, err)
    assert took < {1: 8, 143: 6}[code], took  # not the 60 s the main thread would sleep


TORCHRUN_SCRIPT = """
import os, signal, sys, time
import torch.distributed as dist
from misbench.runtime import distributed
distributed.ensure_initialized()
rank = distributed.world()[0]
open(f"ready{rank}", "w").write(str(os.getpid()))
if rank == 0:
    if sys.argv[1] == "hung":
        os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: no collective, no beat
    time.sleep(600)
else:
    from misbench.runtime.interrupts import terminate_as_interrupt

    with terminate_as_interrupt():  # SIGTERM handled in Python, as every misbench command does
        dist.barrier()  # blocked in gloo, waiting for rank 0
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hung", "term"])
def test_torchrun_rank_whose_peer_hangs_or_that_is_terminated_ends_promptly(tmp_path, case):
    (tmp_path / "run.py").write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MISBENCH_DIST_PEER_TIMEOUT_S": "3", "MISBENCH_TERM_GRACE_S": "2"}
    # torchrun as a module of this interpreter (the torchrun script's shebang may name another environment)
    runner = subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                               "--standalone", "--nproc-per-node", "2", "run.py", case], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ready1").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        pid = int((tmp_path / "ready1").read_text())
        start = time.monotonic()
        if case == "term":
            os.kill(pid, signal.SIGTERM)
        while os.path.exists(f"/proc/{pid}") and time.monotonic() - start < 60:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[1].split()[0] == "Z":
                    break
            time.sleep(0.2)
        took = time.monotonic() - start
    finally:
        for rank in (0, 1):  # the workers run in sessions of their own
            if (tmp_path / f"ready{rank}").exists():
                try:
                    os.kill(int((tmp_path / f"ready{rank}").read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        os.killpg(runner.pid, signal.SIGKILL)
        out = runner.communicate()[0]
    assert took < 15, (took, out[-2000:])  # not the 120-minute collective timeout
    assert ("rank 0 has not answered" if case == "hung" else "SIGTERM not acted on") in out, out[-2000:]


# -- a newcomer's first hour --------------------------------------------------------------------------------------

def test_files_that_are_no_model_are_named_for_what_they_are(tmp_path):
    import json as _json

    from misbench.errors import MisbenchError
    from misbench.models.loading import load_model

    folder = make_image_folder(tmp_path / "images", classes=1, per_class=1, size=8)
    acts = write_acts(tmp_path / "acts.h5", folder, {"l": np.zeros((1, 2))})
    (tmp_path / "eval.json").write_text(_json.dumps({"top1": 0.5}))
    (tmp_path / "mis.csv").write_text("layer,unit,status\na,0,ok\n")
    header = _json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    (tmp_path / "notes.txt").write_text("hello, this is not a model\n")
    (tmp_path / "empty.pt").touch()  # found by trying: "cannot read empty.pt as a torch file: " (no reason)
    cases = {acts: ("an HDF5 file", "misbench score"), tmp_path / "empty.pt": ("is empty (0 bytes)", "fetch it again"), tmp_path / "eval.json": ("a JSON file", "--eval"),
             tmp_path / "mis.csv": ("a mis.csv", "report"), tmp_path / "m.safetensors": ("safetensors", "--arch"),
             tmp_path / "notes.txt": ("a text file", "torchvision name"),
             folder / "class_00" / "img_000.png": ("a PNG image", "--data")}
    for path, (what, reader) in cases.items():
        with pytest.raises(MisbenchError) as err:
            load_model(str(path))
        assert what in str(err.value) and reader in str(err.value), str(err.value)
        assert "pickle" not in str(err.value)
    res = CliRunner().invoke(cli, ["audit", str(acts)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "an HDF5 file" in lines[0], res.output


NOTEBOOK = """
import logging, sys, types
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")

class ZMQInteractiveShell:  # what a Jupyter kernel's get_ipython() returns
    pass

sys.modules["IPython"] = types.SimpleNamespace(get_ipython=lambda: ZMQInteractiveShell())
import misbench
from misbench.runtime.progress import NotebookProgress, resolve_progress
assert isinstance(resolve_progress("auto"), NotebookProgress)
misbench.score(sys.argv[1], "all", similarity="pixel", image_size=16, selection="quantile", quantile=0.5, tasks=2,
               explanations=2, n_boot=10, distances="faiss")
"""


def test_notebooks_get_progress_bars_by_default_and_no_faiss_loader_lines(tmp_path):
    from misbench.runtime.progress import resolve_progress

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=6, size=16)
    acts = write_acts(tmp_path / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(12, 2))})
    assert resolve_progress("auto") is None  # not a notebook: silent
    run = subprocess.run([sys.executable, "-c", NOTEBOOK, str(acts)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "embed" in run.stderr and "12/12" in run.stderr, run.stderr  # tqdm.auto's bars (text without ipywidgets)
    assert "faiss" not in run.stdout.lower().replace("distances", ""), run.stdout  # INFO logs on, FAISS's loader off


def _first_classes(root, n) -> int:
    """The reference: class folders among the first n images of a folder listed in sorted order, by hand."""
    order = [c for c in sorted(os.listdir(root)) for _ in sorted(os.listdir(root / c))]
    return len(set(order[:n]))


def test_limits_say_how_many_classes_they_cover(tmp_path, caplog):
    from misbench.datasets.sources import load_data
    from misbench.datasets.subset import first_images

    root = make_image_folder(tmp_path / "images", classes=4, per_class=5, size=8)
    source = load_data(str(root))
    for limit in (3, 7, 12, 20, 25, None):
        caplog.clear()
        subset = first_images(source, limit, "train_limit")
        n = min(limit or 20, 20)
        assert subset.images == n and subset.of == 20
        covered = _first_classes(root, n)
        if limit is None:
            assert subset.record() is None and "cover" not in caplog.text
            continue
        assert subset.record() == {"option": "train_limit", "limit": limit, "images": n, "of": 20,
                                   "classes_covered": covered, "classes": 4}
        if covered < 4:
            assert f"train_limit {limit} takes the first {n} of 20 images" in caplog.text
            assert f"cover {covered} of the 4 classes" in caplog.text
        else:
            assert "cover" not in caplog.text


@pytest.fixture
def limited(tmp_path):
    from conftest import make_checkpoint

    make_image_folder(tmp_path / "images", classes=3, per_class=4, size=16)
    make_checkpoint(tmp_path / "m.pt")
    return tmp_path


def _subset(option, limit, root, of=12, classes=3):
    return {"option": option, "limit": limit, "images": min(limit, of), "of": of,
            "classes_covered": _first_classes(root, limit), "classes": classes}


@pytest.mark.parametrize("command", ["extract", "eval", "retrain", "prune"])
def test_every_limit_warns_with_its_classes_and_is_recorded_in_the_output(limited, command, caplog, monkeypatch):
    """--limit (extract, eval), --train-limit and --val-limit (retrain, prune): a warning names the classes the
    subset covers of the total, and the output records the subset."""
    import h5py
    import json

    from misbench.models.checkpoint import load_checkpoint_dict

    images = limited / "images"
    args = {"extract": ["extract", "m.pt", "--data", "images", "--layers", "softmax", "--limit", "5", "--out", "a.h5"],
            "eval": ["eval", "m.pt", "--data", "images", "--limit", "5", "--out", "eval.json"],
            "retrain": ["retrain", "m.pt", "--data", "images", "--val-data", "images", "--epochs", "1",
                        "--train-limit", "3", "--val-limit", "6", "--batch-size", "4", "--out", "r.pt"],
            "prune": ["prune", "m.pt", "--method", "structured", "--rate", "0.5", "--data", "images", "--val-data",
                      "images", "--epochs", "1", "--train-limit", "3", "--val-limit", "6", "--batch-size", "4",
                      "--out", "p.pt"]}[command]
    monkeypatch.chdir(limited)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    if command == "extract":
        with h5py.File(limited / "a.h5") as h5:
            assert json.loads(h5.attrs["subset"]) == _subset("limit", 5, images)
    elif command == "eval":
        assert json.loads((limited / "eval.json").read_text())["subset"] == _subset("limit", 5, images)
    else:
        training = load_checkpoint_dict(limited / ("r.pt" if command == "retrain" else "p.pt"))["training"]
        assert training["subsets"] == {"train": _subset("train_limit", 3, images),
                                       "val": _subset("val_limit", 6, images)}
    warned = {(o, n): _first_classes(images, n) for o, n in
              ([("--limit", 5)] if command in ("extract", "eval") else [("--train-limit", 3), ("--val-limit", 6)])}
    for (option, n), covered in warned.items():
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{option} {n} ")]
        assert len(lines) == 1 and f"cover {covered} of the 3 classes" in lines[0], caplog.text


def test_a_studys_refused_setting_names_its_config_key(limited, caplog, monkeypatch):
    """`misbench study`: a step's setting is named as the config spells it, not as the step's command's flag
    (the limits' warnings: test_study_limits_warn_with_their_classes_and_are_recorded)."""
    from conftest import write_study

    monkeypatch.chdir(limited)
    images = limited / "images"
    config = write_study(limited / "study.toml", model={"spec": limited / "m.pt"}, data={"train": images, "val": images},
                         extract={"limit": 5}, score={"selection": "fair"})  # 5 rows: too few for fair's tasks
    result = CliRunner().invoke(cli, ["study", str(config), "--out", "out"])
    assert result.exit_code == 1
    error = result.output.split("Error: ")[1]
    assert error.startswith("[score] selection fair needs at least 18 rows in the activation file, found 5"), error
    assert "lower [score] tasks/[score] explanations, or use [score] selection quantile" in error and "--" not in error
    assert [r.getMessage()[:18] for r in caplog.records if "takes the first" in r.getMessage()] == ["[extract] limit 5 "]


def test_unlimited_outputs_record_no_subset(limited, monkeypatch):
    import h5py
    import json

    monkeypatch.chdir(limited)
    runner = CliRunner()
    assert runner.invoke(cli, ["extract", "m.pt", "--data", "images", "--layers", "softmax", "--out", "a.h5"]).exit_code == 0
    assert runner.invoke(cli, ["eval", "m.pt", "--data", "images", "--out", "e.json"]).exit_code == 0
    with h5py.File(limited / "a.h5") as h5:
        assert "subset" not in h5.attrs
    assert "subset" not in json.loads((limited / "e.json").read_text())


def test_study_limits_warn_with_their_classes_and_are_recorded(limited, caplog):
    """The config's [train]/[retrain] train_limit, val_limit and [extract] limit: the same warning, naming the config
    key, and the same record."""
    import h5py
    import json

    from misbench.models.checkpoint import load_checkpoint_dict
    from misbench.studies.config import load_config
    from misbench.studies.run import Study
    from conftest import TINY_ARCH, write_study

    images = limited / "images"
    config = write_study(limited / "study.toml", model=TINY_ARCH, data={"train": images, "val": images},
                         train={"epochs": 1, "batch_size": 4, "train_limit": 7},
                         retrain={"batch_size": 4, "train_limit": 3, "val_limit": 6}, extract={"limit": 5})
    study = Study(load_config(config), limited / "out")
    run = "structured-l1-0.5-oneshot"
    for name in ("train:base", f"prune:{run}", f"eval:{run}", f"extract:{run}"):
        step = study.step(name)
        for path in step.outputs.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        caplog.clear()
        step.action(False)
        messages = [r.getMessage() for r in caplog.records if " takes the first " in r.getMessage()]
        expected = {"train:base": [("train_limit", 7), ("val_limit", None)], f"prune:{run}": [("train_limit", 3),
                    ("val_limit", 6)], f"eval:{run}": [("val_limit", 6)], f"extract:{run}": [("limit", 5)]}[name]
        section = {"train": "train", "prune": "retrain", "eval": "retrain", "extract": "extract"}[name.split(":")[0]]
        said = [(o, n) for o, n in expected if n is not None]
        assert len(messages) == len(said), (name, messages)
        for (option, n), line in zip(said, messages):
            assert line.startswith(f"[{section}] {option} {n} ") and f"cover {_first_classes(images, n)} of the 3" in line
        out = step.outputs
        if name.startswith("prune") or name.startswith("train"):
            subsets = load_checkpoint_dict(out["checkpoint"])["training"]["subsets"]
            assert subsets == {o.split("_")[0]: _subset(o, n, images) for o, n in said}
        elif name.startswith("eval"):
            assert json.loads(out["eval"].read_text())["subset"] == _subset("val_limit", 6, images)
        else:
            with h5py.File(out["acts"]) as h5:
                assert json.loads(h5.attrs["subset"]) == _subset("limit", 5, images)


def test_train_dictionary_positions_limit_warns_and_is_recorded(limited, caplog):
    from torch import nn

    from misbench.activations.positions import sample_positions
    from misbench.models.loading import load_model

    loaded = load_model(str(limited / "m.pt"))
    layer = next(name for name, m in loaded.model.named_modules() if isinstance(m, nn.Conv2d))
    _, record = sample_positions(loaded, str(limited / "images"), layer, 50, limit=5, batch_size=4, device="cpu")
    assert record["images"] == 5 and record["subset"] == _subset("limit", 5, limited / "images")
    assert f"cover {_first_classes(limited / 'images', 5)} of the 3 classes" in caplog.text


# -- item 11: counts, labels and data checked before any model or backend loads ------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Every model and similarity-backend loader raises if called: an error that comes through these was found
    before any load."""
    import misbench.api
    import misbench.models.loading
    import misbench.scoring.run

    def loaded(*args, **kwargs):
        raise AssertionError("a model or backend was loaded before the check")

    monkeypatch.setattr(misbench.models.loading, "load_model", loaded)
    monkeypatch.setattr(misbench.api, "_load_model", loaded)
    # the backend's builder under its name now and before issue 19 (the test also runs on the code before it)
    for name in ("backend_from_settings", "build_backend"):
        monkeypatch.setattr(misbench.scoring.run, name, loaded, raising=False)


@pytest.mark.parametrize("selection,words", [([], ["--selection fair needs at least 400 rows", "found 200",
                                                   "--selection quantile"]),
                                              (["--selection", "quantile", "--quantile", "0.02"],
                                               ["--quantile 0.02 of 200 rows leaves 4 images per side"])])
def test_score_refuses_too_few_rows_before_its_backend_loads(tmp_path, no_loading, selection, words):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=100, size=8)
    write_acts(tmp_path / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(200, 3))})
    cli_error(["score", "acts.h5", "--layer", "all", "--out", "s.csv", *selection], tmp_path, *words)
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("command", [
    ["extract", "mobilenet_v2:IMAGENET1K_V1", "--layers", "features.14", "--out", "a.h5"],
    ["eval", "mobilenet_v2:IMAGENET1K_V1", "--out", "e.json"],
    ["retrain", "mobilenet_v2:IMAGENET1K_V1", "--epochs", "1", "--out", "r.pt"],
    ["prune", "resnet18:random", "--method", "structured", "--rate", "0.5", "--epochs", "1", "--out", "p.pt"]])
def test_class_folders_the_labels_cannot_map_are_refused_before_the_model_loads(tmp_path, no_loading, command):
    make_image_folder(tmp_path / "images", classes=2, per_class=2, size=8)  # class_00, class_01: no WNIDs
    cli_error([*command, "--data", "images"], tmp_path, "class folders class_00, class_01 are not ImageNet WNIDs",
              "--labels folder-order")


def test_unlabelled_training_data_is_refused_before_the_model_loads(tmp_path, no_loading):
    (tmp_path / "flat").mkdir()
    for i in range(3):
        from PIL import Image
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / f"{i}.png")
    cli_error(["retrain", "resnet18:IMAGENET1K_V1", "--data", "flat", "--out", "r.pt"], tmp_path,
              "flat is a folder of images without class folders (unlabelled)")
    cli_error(["retrain", "resnet18:IMAGENET1K_V1", "--out", "r.pt"], tmp_path, "retraining needs training data")


# -- item 14: study --dry-run sums the plan up and names each missing input -----------------------------------------

def test_study_dry_run_names_each_missing_input_and_estimates_gpu_hours(limited, monkeypatch):
    from conftest import write_study

    monkeypatch.setenv("TORCH_HOME", str(limited / "empty_torch_home"))
    images = limited / "images"
    runner = CliRunner()
    config = write_study(limited / "bad.toml", model={"spec": str(limited / "missing.pt")},
                         data={"train": limited / "no_such_folder", "val": images}, score={"similarity": "lpips-alex"})
    r = runner.invoke(cli, ["study", str(config), "--out", str(limited / "out_bad"), "--dry-run"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert r.exit_code == 1 and len(errors) == 3, r.output
    assert "config [data] train" in errors[0] and "no_such_folder is not a folder" in errors[0]
    assert "config [model] spec" in errors[1] and "missing.pt" in errors[1]
    assert "config [score] similarity" in errors[2] and "alexnet-owt-7be5be79.pth" in errors[2]
    assert "cannot stage" in errors[2]  # the hint names `misbench assets stage` only for what it can stage
    assert r.stdout.splitlines()[-1].startswith("2 networks, 8 steps (8 to run, 0 cached); GPU hours: unknown")
    # everything in place: exit 0 and the hours at docs/reproducing.md's rates, summed here by hand
    config = write_study(limited / "good.toml", model={"spec": str(limited / "m.pt")},
                         data={"train": images, "val": images})
    r = runner.invoke(cli, ["study", str(config), "--out", str(limited / "out_good"), "--dry-run"])
    assert r.exit_code == 0 and not r.stderr, r.output
    n = 12  # images in the folder, train = val = extraction
    seconds = (n / 2750 + n / 2500) + 2 * n / 2500 + 2 * n / (50000 / 60) + 2 * 5 * 60  # prune, 2 evals, extracts, scores
    lines = r.stdout.splitlines()
    assert len(lines) == 9 and all(line.startswith("run ") for line in lines[:-1])
    assert lines[-1].startswith(f"2 networks, 8 steps (8 to run, 0 cached); about {seconds / 3600:,.1f} GPU hours")


# -- item 4, found by trying: outputs inside the DATA folder, report folders that hold their inputs ---------------

@pytest.mark.parametrize("command", [["extract", "m.pt", "--layers", "softmax"], ["eval", "m.pt"],
                                     ["retrain", "m.pt", "--epochs", "1"]])
def test_an_output_may_not_replace_or_add_an_image_of_data(limited, command):
    images = limited / "images"
    before = {p: sha256_file(p) for p in images.rglob("*.png")}
    for out in ("images/class_00/img_000.png", "images/new.jpg"):
        cli_error([*command, "--data", "images", "--out", out, "--overwrite"], limited,
                  f"--out {out} lies inside the input folder --data images")
    assert {p: sha256_file(p) for p in images.rglob("*.png")} == before


def test_a_report_folder_may_not_hold_its_inputs(limited, monkeypatch):
    import shutil

    folder = make_image_folder(limited / "imgs", classes=2, per_class=6, size=8)
    scores = limited / "rep" / "s.csv"
    scores.parent.mkdir()
    write_acts(limited / "acts.h5", folder, {"l": np.random.default_rng(0).normal(size=(12, 2))})
    monkeypatch.chdir(limited)
    result = CliRunner().invoke(cli, ["score", "acts.h5", "--layer", "all", "--similarity", "pixel", "--image-size",
                                      "16", "--selection", "quantile", "--quantile", "0.5", "--tasks", "2",
                                      "--explanations", "2", "--out", str(scores)])
    assert result.exit_code == 0, result.output
    kept = sha256_file(scores)
    for args in (["layers", "--scores", "rep/s.csv", "--out", "rep"],
                 ["compare", "--scores", "a=rep/s.csv:l", "--scores", "acts_copy.csv", "--out", "rep"],
                 ["classwise", "--scores", "rep/s.csv", "--acts", "acts.h5", "--out", "rep"]):
        shutil.copy(scores, limited / "acts_copy.csv")
        (limited / "rep" / "report.html").write_text("an earlier report: --overwrite replaces the folder")
        cli_error(["report", *args, "--overwrite"], limited, "--out rep holds the input", "rep/s.csv")
        assert sha256_file(scores) == kept
    monkeypatch.chdir(limited / "rep")  # `--out .`: the folder of the inputs, named by a dot
    cli_error(["report", "layers", "--scores", "s.csv", "--out", ".", "--overwrite"], limited / "rep",
              "--out . holds the input scores s.csv")
    (limited / "elsewhere").mkdir()
    monkeypatch.chdir(limited / "elsewhere")
    result = CliRunner().invoke(cli, ["report", "classwise", "--scores", str(scores), "--acts",
                                      str(limited / "acts.h5"), "--layer", "l", "--out", "."])
    assert result.exit_code == 0 and (limited / "elsewhere" / "report.html").exists(), result.output


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9])
def test_moving_average_of_fewer_values_than_its_window(n):
    """A class-wise report of a 2-class model drew a 3-point average of 2 values (a traceback, found by trying)."""
    from misbench.reports.stats import moving_average

    values = np.random.default_rng(n).random(n)
    values[n // 2] = np.nan
    for window in (3, 5):
        w = window if window <= n else max(1, n - (1 - n % 2))
        half = w // 2
        expected = [np.nanmean(values[max(0, i - half):i + half + 1]) if np.isfinite(values[max(0, i - half):i + half + 1]).any()
                    else np.nan for i in range(n)]
        np.testing.assert_allclose(moving_average(values, window), expected)


def test_merge_scores_refuses_a_part_cut_short(shards):
    """Found by trying: a part's mis.csv without a layer's last unit left no gap among the units and merged."""
    import csv

    rows = list(csv.DictReader(open(shards / "s0.csv", newline="")))
    last = max((r for r in rows if r["layer"] == "a"), key=lambda r: int(r["unit"]))
    assert int(last["unit"]) == 4  # layer a's last unit (5 units) is shard 0's: dropping it leaves no gap
    text = (shards / "s0.csv").read_text().splitlines()
    (shards / "s0.csv").write_text("\n".join(line for line in text if not line.startswith("a,4,")) + "\n")
    res = CliRunner().invoke(cli, ["merge-scores", str(shards / "s0.csv"), str(shards / "s1.csv"), "--out",
                                   str(shards / "m.csv")])
    assert res.exit_code == 1 and "holds 2 unit(s) of layer a, its mis.json counted 3" in res.output, res.output
    assert not (shards / "m.csv").exists()


def test_a_link_to_itself_is_left_out_not_fatal(tmp_path, caplog):
    """Found by trying: `ln -s loopy class_00/loopy` (ELOOP) failed the whole listing; it is left out, named."""
    from misbench.datasets.sources import load_data

    root = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=8)
    (root / "class_00" / "loopy").symlink_to("loopy")
    (root / "class_01" / "loop.png").symlink_to("loop.png")
    source = load_data(str(root))
    assert [source.path(i) for i in range(len(source))] == sorted(
        f"{c}/{f}" for c in ("class_00", "class_01") for f in os.listdir(root / c) if not f.startswith("loop"))
    assert "class_00/loopy cannot be followed" in caplog.text and "class_01/loop.png cannot be followed" in caplog.text
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((root / "class_00" / "img_000.png").read_bytes())
    (flat / "self").symlink_to("self")
    source = load_data(str(flat))
    assert [source.path(i) for i in range(len(source))] == ["a.png"] and source.label(0) == -1
