"""benchmarks/gpu_suite.sh is only worth its GPU time if every line of it runs: its CPU mode runs the
same code (extraction, embeddings, MIS, masked AMP training, a DDP epoch under torchrun) at toy sizes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


EXPECTED_ROWS = ["forward loop GoogLeNet", "extract GoogLeNet conv+softmax,", "extract GoogLeNet conv+softmax AMP",
                 "embed lpips-alex", "embed lpips-vgg", "embed lpips-squeeze", "embed deepfeat:mobilenet_v2",
                 "embed pixel", "MIS lpips-alex", "train step GoogLeNet AMP", "train step MiniInception AMP",
                 "DDP train step GoogLeNet"]


def _check_rows(rows):
    for prefix in EXPECTED_ROWS:
        values = [v for name, v in rows.items() if name.startswith(prefix)]
        assert values and all(isinstance(v, float) and v > 0 for v in values), prefix


def test_gpu_suite_parts_run_on_cpu_in_process(tmp_path, monkeypatch):
    """The default suite's share of the test below: every part of benchmarks/gpu_suite.py at toy sizes, in this
    process (no interpreter start-up, no torchrun); the shell wrapper and its two-process DDP epoch: -m slow."""
    import dataclasses

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_suite

    # smaller still than --quick: one timed step, two units, a handful of images (every code path, no figure)
    monkeypatch.setattr(gpu_suite, "QUICK", dataclasses.replace(
        gpu_suite.QUICK, extract_images=16, extract_batch=8, embed_images=8, embed_batch=8, mis_units=2,
        train_steps=1, train_batch=(2, 4)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = tmp_path / "suite.json"
        assert gpu_suite.main(["--device", "cpu", "--quick", "--json", str(table)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {name: value for name, value, _unit in json.loads(table.read_text())}
    assert not [name for name in rows if "FAILED" in name]
    _check_rows(rows)


@pytest.mark.slow
def test_gpu_suite_runs_every_part_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MISBENCH_DDP": "1", "MISBENCH_DDP_PROCS": "2",
           "MISBENCH_DDP_IMAGES": "32", "MISBENCH_DDP_DEVICE": "cpu", "MISBENCH_DDP_WORKERS": "0",
           "OMP_NUM_THREADS": "1"}
    table = tmp_path / "suite.json"
    run = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--device", "cpu", "--quick", "--json", str(table)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "FAILED" not in log
    assert "Grad strides do not match" not in log  # masked gradients keep the layout DDP expects
    _check_rows({name: value for name, value, _unit in json.loads(table.read_text())})
    assert re.search(r"DDP retraining epoch, GoogLeNet, 32 images, 2 processes on cpu: \d+ s", log)


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The one script a GPU node runs (tests with CUDA among the devices, then the suite) works end to end."""
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(tmp_path / "check")], cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "gpu_check: passed" in run.stdout
    assert re.search(r"\d+ passed", (tmp_path / "check" / "tests.log").read_text())
    rows = json.loads((tmp_path / "check" / "suite.json").read_text())
    assert not [r for r in rows if "FAILED" in r[0]] and len(rows) > 15


def _bench(tmp_path, script, *args):
    run = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return run.stdout


def test_score_scale_benchmark_parts_in_process(monkeypatch):
    """The default suite's share of the test below (whose three processes take most of its time): the unit counts
    are GoogLeNet's, and every distance engine it times runs. That each image is embedded once: test_scale.py."""
    import torchvision

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import score_scale

    units = score_scale.googlenet_units()
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    batchnorms = [m.num_features for m in model.modules() if type(m).__name__ == "BatchNorm2d"]
    assert units.pop("softmax") == 1000 and sorted(units.values()) == sorted(batchnorms)
    timings = score_scale.engines(n_rows=50, dim=8, units=2, device="cpu", repeats=1)
    assert len(timings) == 4 and all(seconds > 0 for _name, seconds in timings)


@pytest.mark.slow
def test_score_scale_benchmark_at_reduced_size(tmp_path):
    """GoogLeNet-shaped scoring, multi-layer and multi-chunk: every needed image embedded exactly once."""
    out = _bench(tmp_path, "score_scale.py", "--quick")
    counts = re.findall(r"(\d+) units: embedded/distinct (\d+)/(\d+)", out)
    assert len(counts) == 2 and int(counts[1][0]) > 7 * int(counts[0][0])
    assert all(int(e) == int(d) > 0 for _units, e, d in counts)
    assert re.search(r"the units over the same images: [\d.]+x the time", out)
    engines = dict(re.findall(r"  (FAISS CPU, one call per unit \(before\)|FAISS CPU, one call per chunk|torch CPU, one "
                              r"call per chunk)\s+([\d.]+) ms", out))
    assert len(engines) == 3 and all(float(v) > 0 for v in engines.values())


def test_topk_scale_benchmark_at_reduced_size(tmp_path):
    """The streamed top/bottom-K equals a brute-force top-k over all rows, in bounded memory."""
    out = _bench(tmp_path, "topk_scale.py", "--quick")
    assert "kept rows equal brute-force top-k over all rows: True (2000 units checked)" in out
    ratio = float(re.search(r"one batch \d+ MiB: ([\d.]+)x", out).group(1))
    assert ratio <= 1.5


def test_ms_scale_benchmark_quick(tmp_path):
    """benchmarks/ms_scale.py runs, and its identity agrees with its own brute force."""
    out = _bench(tmp_path, "ms_scale.py", "--quick")
    diff = float(re.search(r"max \|difference\| (\S+)", out).group(1))
    assert diff < 1e-6
    assert re.search(r"throughput, 3000 images x 200 units x 64 dims: [\d.]+ s, \d+ units/s", out)


def test_conf_intervals_benchmark_at_reduced_size(tmp_path):
    """The closed-form per-unit intervals run for all units at once, faster than the per-unit bootstrap they
    replace, and identically on a repeated call."""
    out = _bench(tmp_path, "conf_intervals.py", "--units", "2000", "--baseline-units", "20")
    assert "repeated call identical: yes" in out
    assert float(re.search(r"speed-up: ([\d.]+)x", out).group(1)) > 1
