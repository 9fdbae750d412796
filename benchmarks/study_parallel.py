"""A study's grid on the tests' two-CPU single-node Slurm (tests/slurm_cluster.py) against the local executor.

N pruned-and-retrained runs of a small network, each step on one CPU (one torch thread in both executors):
the local executor runs the steps one after another, the Slurm executor submits each as one job and the
cluster runs two at a time. Prints the wall-time ratio (target: at least 1.6x on 2 CPUs) and the submission
overhead per step (`misbench study --executor slurm` from start to return, divided by the jobs it submitted).
Needs root or installed Slurm + munge (scripts/ensure-slurm.sh). The outputs of both runs are compared too.

    python benchmarks/study_parallel.py [--runs 6] [--epochs 60]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Timer, generated_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_study  # noqa: E402
from slurm_cluster import Cluster, missing_commands  # noqa: E402


def misbench(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "misbench", *map(str, args)], env=env, capture_output=True, text=True)


def main(runs: int, epochs: int) -> None:
    missing = missing_commands()
    if missing:
        sys.exit(f"Slurm is not installed ({', '.join(missing)} missing): run scripts/ensure-slurm.sh as root")
    root = Path(tempfile.mkdtemp(prefix="misbench-study-parallel-"))
    cluster = Cluster(root / "cluster")
    try:
        cluster.start()
        train = generated_folder(root / "train", 512, size=32)
        val = generated_folder(root / "val", 48, size=32, seed=1)
        rates = [round(0.1 + 0.8 * i / max(runs - 1, 1), 3) for i in range(runs)]
        # the tests' tiny study, unstructured at `runs` rates, on a wider network built from its architecture
        config = write_study(root / "study.toml", study={"name": "parallel"},
                             model={"arch": "mini_inception", "num_classes": 4, "arch_kwargs": {"width": 16},
                                    "preprocess": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}},
                             data={"train": train, "val": val}, train={"epochs": 1, "batch_size": 32},
                             pruning={"methods": ["unstructured"], "rates": rates},
                             retrain={"epochs": epochs, "batch_size": 32},
                             extract={"layers": ["softmax"], "data": val, "batch_size": None},
                             runtime={"workers": 0}, executor={"cpus_per_task": 1, "time_min": 60})
        # one thread per step in both executors (the jobs get SLURM_CPUS_PER_TASK=1)
        env = {**os.environ, "SLURM_CONF": str(cluster.conf), "OMP_NUM_THREADS": "1"}
        with Timer() as local:
            r = misbench("study", config, "--out", root / "local", env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        with Timer() as submitted:
            r = misbench("study", config, "--out", root / "slurm", "--executor", "slurm", env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        jobs = [line.rsplit(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("submitted ")]
        with Timer() as ran:
            while set(cluster.queue()) & set(jobs):
                time.sleep(0.5)
        status = misbench("study", "status", root / "slurm", env=env)
        assert status.returncode == 0, status.stdout[-3000:]
        same = all((root / "local" / "runs" / d.name / "mis.csv").read_bytes() == (d / "mis.csv").read_bytes()
                   for d in (root / "slurm" / "runs").iterdir())
        slurm_total = submitted.seconds + ran.seconds
        work = {o: sum(e.get("seconds") or 0 for e in json.loads((root / o / "manifest.json").read_text())["steps"].values())
                for o in ("local", "slurm")}
        print(f"{runs} runs x {epochs} epochs, {len(jobs)} steps on {cluster.cpus} CPUs")
        print(f"local executor   {local.seconds:8.1f} s")
        print(f"slurm executor   {slurm_total:8.1f} s (submission {submitted.seconds:.1f} s, "
              f"{submitted.seconds / len(jobs):.2f} s per step)")
        print(f"steps' own seconds: local {work['local']:.1f} s, in the jobs {work['slurm']:.1f} s; per job, the time "
              f"a CPU spent outside its step (start-up, scheduling, idle on dependencies): "
              f"{(cluster.cpus * ran.seconds - work['slurm']) / len(jobs):.1f} s")
        print(f"ratio local/slurm {local.seconds / slurm_total:.2f}x (target >= 1.6x on 2 CPUs); "
              f"mis.csv identical: {same}")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    # a SIGTERM ends the script through its `finally`, which stops the cluster it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    main(args.runs, args.epochs)
