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
    rows = {name: value for name, value, _unit in json.loads(table.read_text())}
    expected = ["forward loop GoogLeNet", "extract GoogLeNet conv+softmax,", "extract GoogLeNet conv+softmax AMP",
                "embed lpips-alex", "embed lpips-vgg", "embed lpips-squeeze", "embed deepfeat:mobilenet_v2", "embed pixel",
                "MIS lpips-alex", "train step GoogLeNet AMP", "train step MiniInception AMP", "DDP train step GoogLeNet"]
    for prefix in expected:
        values = [v for name, v in rows.items() if name.startswith(prefix)]
        assert values and all(isinstance(v, float) and v > 0 for v in values), prefix
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
