"""`misbench study --executor slurm` against a real single-node Slurm (the `slurm_cluster` fixture, conftest.py):
failures cancel their dependants and a resubmission runs only what is not done, a second submitter is refused,
`study cancel` empties the queue, SIGTERM requeues a retraining job that resumes to the same checkpoint; the
manifest under concurrent writers; the bad-input errors. No mocks: every job is a Slurm job."""

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_checkpoint, make_image_folder, write_study
from manifest_writer import write_records
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.studies.manifest import Manifest

# one cluster per test run: every test of this module goes to the same xdist worker (Makefile: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("slurm")

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 600  # seconds for a whole tiny study: eight engineers share two cores

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-study")
    make_image_folder(root / "images", classes=3, per_class=8, size=16)
    shutil.copytree(root / "images", root / "extract")
    make_checkpoint(root / "m.pt")
    return root


def config(d: Path, methods=(), epochs=0, executor=None) -> Path:
    """The tiny study on d's checkpoint and images; `executor`: [executor] keys besides time_min (a step kind's
    resources as a table), or False for no [executor] section."""
    return write_study(d / "study.toml", study={"name": "slurm"}, model={"spec": d / "m.pt"},
                       data={"train": d / "images", "val": d / "images"}, pruning={"methods": list(methods)},
                       retrain={"epochs": epochs}, extract={"data": d / "extract"},
                       executor=None if executor is False else {"time_min": 30, **(executor or {})})


def fresh(world, tmp_path) -> Path:
    for name in ("images", "extract"):
        shutil.copytree(world / name, tmp_path / name)
    shutil.copy(world / "m.pt", tmp_path / "m.pt")
    return tmp_path


def misbench(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def submit(cfg, out):
    r = misbench("study", cfg, "--out", out, "--executor", "slurm")
    assert r.exit_code == 0, r.output
    return jobs_of(r.stdout)


def jobs_of(stdout: str) -> dict:
    return dict(line.removeprefix("submitted ").split(": job ") for line in stdout.splitlines()
                if line.startswith("submitted "))


def steps(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())["steps"]


def wait_for(cluster, jobs, timeout=JOB_TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not set(cluster.queue()) & set(jobs):
            return
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} still queued after {timeout} s: {cluster.run('squeue').stdout}")


def starts(log: str, job: str) -> int:
    """How often slurmctld's log says it started `job` (the main scheduler allocates, backfill starts)."""
    return len(re.findall(rf"(?:Allocate|_start_job: Started) JobId={job} ", log))


def status(out):
    r = misbench("study", "status", out)
    rows = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()[:-1]}
    return r, rows


def _a_failed_step_cancels_its_dependants(slurm_cluster, world, tmp_path):
    d = fresh(world, tmp_path)
    cfg, out = config(d), d / "out"
    shutil.rmtree(d / "extract")  # extract:base fails on its missing data folder
    jobs = submit(cfg, out)
    assert set(jobs) == {"eval:base", "extract:base", "score:base", "report"}
    wait_for(slurm_cluster, jobs.values())
    r, rows = status(out)
    assert r.exit_code == 1, r.output
    assert rows == {"eval:base": "done", "extract:base": "failed", "score:base": "cancelled", "report": "cancelled"}
    failed = next(line for line in r.stdout.splitlines() if "extract:base" in line)
    log = Path(steps(out)["extract:base"]["log"])
    assert f"job {jobs['extract:base']}" in failed and str(log) in failed and "is neither an existing directory" in failed
    assert "is neither an existing directory" in log.read_text()  # the job's own log holds the traceback
    assert r.stdout.splitlines()[-1] == "4 steps: 2 cancelled, 1 done, 1 failed"
    log = (slurm_cluster.log / "slurmctld.log").read_text()
    assert all(starts(log, jobs[n]) == 1 for n in ("eval:base", "extract:base"))
    assert all(starts(log, jobs[n]) == 0 for n in ("score:base", "report"))
    return d, cfg, out, jobs


def test_a_failed_step_cancels_its_dependants(slurm_cluster, world, tmp_path):
    """The default suite's share of the next test: two jobs run, one fails, its two dependants never start."""
    _a_failed_step_cancels_its_dependants(slurm_cluster, world, tmp_path)


# slow: three more jobs one after another (about 20 s); the test above fails and cancels
@pytest.mark.slow
def test_a_failed_step_cancels_its_dependants_and_a_resubmission_runs_only_those(slurm_cluster, world, tmp_path):
    d, cfg, out, jobs = _a_failed_step_cancels_its_dependants(slurm_cluster, world, tmp_path)
    eval_done = steps(out)["eval:base"]["finished_utc"]
    shutil.copytree(world / "extract", d / "extract")  # the fix
    again = submit(cfg, out)
    assert set(again) == {"extract:base", "score:base", "report"}
    wait_for(slurm_cluster, again.values())
    r, rows = status(out)
    assert r.exit_code == 0 and set(rows.values()) == {"done"}, r.output
    assert steps(out)["eval:base"]["finished_utc"] == eval_done
    # every step a Slurm job: the controller started each of the three resubmitted once
    log = (slurm_cluster.log / "slurmctld.log").read_text()
    assert all(starts(log, j) == 1 for j in again.values())


def _second_submitter_is_refused(cfg, out) -> dict:
    jobs = submit(cfg, out)
    second = misbench("study", cfg, "--out", out, "--executor", "slurm")
    assert second.exit_code == 1 and len(second.output.strip().splitlines()) == 1, second.output
    assert all(job in second.output for job in jobs.values()) and "misbench study cancel" in second.output
    local = misbench("study", cfg, "--out", out)
    assert local.exit_code == 1 and jobs["report"] in local.output
    return jobs


def _cancel_leaves_no_job(slurm_cluster, out, jobs: dict) -> None:
    r = misbench("study", "cancel", out)
    assert r.exit_code == 0 and all(j in r.stdout for j in jobs.values() if steps(out)[
        next(n for n, i in jobs.items() if i == j)]["status"] != "done"), r.output
    assert slurm_cluster.wait_idle(60), slurm_cluster.run("squeue").stdout
    r, rows = status(out)
    assert r.exit_code == 2 and "cancelled" in rows.values() and "running" not in rows.values(), r.output


def test_second_submitter_is_refused_and_cancel_leaves_no_job(slurm_cluster, world, tmp_path):
    """The default suite's share of the next test: refused while queued, then cancelled before any job ends."""
    d = fresh(world, tmp_path)
    cfg, out = config(d), d / "out"
    jobs = _second_submitter_is_refused(cfg, out)
    _cancel_leaves_no_job(slurm_cluster, out, jobs)


# slow: waits for a running job and runs the study to its end (55 s); the test above refuses and cancels
@pytest.mark.slow
def test_second_submitter_is_refused_and_cancel_empties_the_queue(slurm_cluster, world, tmp_path):
    d = fresh(world, tmp_path)
    cfg, out = config(d), d / "out"
    jobs = _second_submitter_is_refused(cfg, out)
    deadline = time.time() + JOB_TIMEOUT  # cancel while a job runs: it must end, not requeue itself
    while "RUNNING" not in slurm_cluster.run("squeue", "--noheader", "--format=%T").stdout and time.time() < deadline:
        time.sleep(0.5)
    _cancel_leaves_no_job(slurm_cluster, out, jobs)
    again = submit(cfg, out)
    assert set(again) == {n for n, e in steps(out).items() if e["status"] != "done"} | set(again)
    wait_for(slurm_cluster, again.values())
    r, rows = status(out)
    assert r.exit_code == 0 and set(rows.values()) == {"done"}, r.output


# slow: 20 s of Slurm jobs; a retraining stopped by SIGTERM/SIGKILL resumes to the same checkpoint in
# test_faults' test_prune_killed_after_an_epoch_or_after_the_final_rename_resumes (one process, no Slurm)
@pytest.mark.slow
def test_sigterm_requeues_a_retraining_job_that_resumes_to_the_same_checkpoint(slurm_cluster, world, tmp_path):
    d = fresh(world, tmp_path)
    cfg, out = config(d, methods=["structured"], epochs=8), d / "out"
    jobs = submit(cfg, out)
    prune = jobs["prune:structured-l1-0.5-oneshot"]
    partial = out / "runs" / "structured-l1-0.5-oneshot" / "model.pt.partial"
    deadline = time.time() + JOB_TIMEOUT
    while not partial.exists() and time.time() < deadline:  # an epoch is done: stop it mid-way
        time.sleep(0.1)
    assert partial.exists()
    slurm_cluster.run("scancel", "--signal=TERM", prune, check=True)
    # requeued: Slurm starts it again once the stopped instance's credential expires (slurm_cluster.CRED_EXPIRE)
    wait_for(slurm_cluster, jobs.values())
    entry = steps(out)["prune:structured-l1-0.5-oneshot"]
    assert entry["status"] == "done" and entry["requeues"] == 1 and entry["stopped_by"] == "SIGTERM"
    assert f"Requeuing JobId={prune}" in (slurm_cluster.log / "slurmctld.log").read_text()
    # the uninterrupted run, through the same code in one process with the job's thread count
    r = subprocess.run([sys.executable, "-c", f"""
import torch; torch.set_num_threads(1)
from misbench.studies.config import load_config
from misbench.studies.manifest import Manifest
from misbench.studies.run import Study
study = Study(load_config({str(cfg)!r}), {str(d / 'ref')!r})
study.run_step(Manifest(study.out / 'manifest.json'), study.step('prune:structured-l1-0.5-oneshot'))
"""], capture_output=True, text=True, cwd=d)
    assert r.returncode == 0, r.stderr
    done, ref = (o / "runs" / "structured-l1-0.5-oneshot" / "model.pt" for o in (out, d / "ref"))
    assert_same_checkpoint(done, ref)


def assert_same_checkpoint(a, b):
    """Every byte of content equal but the time it was written (created_utc)."""
    import torch

    from misbench.models.checkpoint import load_checkpoint_dict

    def same(x, y, where):
        assert type(x) is type(y), where
        if isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                if k != "created_utc":
                    same(x[k], y[k], f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), where
        else:
            assert x == y, where

    same(load_checkpoint_dict(a), load_checkpoint_dict(b), str(a))


def test_slurm_bad_input_is_one_line_and_submits_nothing(slurm_cluster, world, tmp_path):
    d = fresh(world, tmp_path)
    out = d / "out"
    r = misbench("study", config(d, executor={"partition": "gpu-nosuch"}), "--out", out, "--executor", "slurm")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "'gpu-nosuch' is not a partition of this cluster" in r.output and "debug" in r.output
    assert slurm_cluster.queue() == [] and not (out / "slurm").exists()
    # a job id Slurm no longer knows (and that recorded no end)
    out.mkdir()
    Manifest(out / "manifest.json").record("report", status="submitted", job_id="999999", log="x.err")
    r, rows = status(out)
    assert r.exit_code == 1 and rows == {"report": "lost"}
    error = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "999999" in error[0] and "--executor slurm" in error[0]


def test_no_sbatch_on_path_and_unknown_executor(world, tmp_path, monkeypatch):
    d = fresh(world, tmp_path)
    cfg = config(d)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = misbench("study", cfg, "--out", d / "out", "--executor", "slurm")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "`sbatch` is not on PATH" in r.output and "--executor local" in r.output
    assert not (d / "out" / "manifest.json").exists()
    r = misbench("study", cfg, "--out", d / "out", "--executor", "slurmm")
    assert r.exit_code == 2 and "'slurmm' is not one of 'local', 'slurm'" in r.output
    from misbench import api

    with pytest.raises(MisbenchError, match="--executor 'slurmm': expected one of local, slurm. Close matches: slurm"):
        api.study(cfg, d / "out", executor="slurmm")


def test_without_submitit_the_error_names_the_extra(world, tmp_path, monkeypatch):
    d = fresh(world, tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)  # what an absent package looks like to import
    r = misbench("study", config(d), "--out", d / "out", "--executor", "slurm")
    assert r.exit_code == 1 and "pip install 'misbench[slurm]'" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("section,match", [
    ("[executor]\npartiton = 'gpu'", "unknown key 'partiton'; allowed keys: account,"),
    ("[executor.prune]\ngpus = 8", r"config \[executor.prune\]: unknown key 'gpus'"),
    ("[executor]\ntime_min = '1h'", r"time_min: expected an integer, got '1h'"),
    ("[executor]\nsbatch = { time = '1:00:00' }", "use the key time_min"),
])
def test_executor_section_is_checked(world, tmp_path, section, match):
    from misbench.studies.config import load_config

    d = fresh(world, tmp_path)
    path = config(d, executor=False)
    path.write_text(path.read_text() + section + "\n")
    with pytest.raises(MisbenchError, match=match):
        load_config(path)


def test_dry_run_shows_each_steps_resources_and_the_estimate(world, tmp_path):
    d = fresh(world, tmp_path)
    cfg = config(d, methods=["structured"], epochs=2,
                 executor={"partition": "cpu", "prune": {"partition": "gpu", "gpus_per_node": 8, "tasks_per_node": 8}})
    r = misbench("study", cfg, "--out", d / "out", "--dry-run", "--executor", "slurm")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 9
    assert "prune:structured-l1-0.5-oneshot  [partition=gpu time=30min nodes=1 tasks/node=8 gpus/node=8" in r.stdout
    assert "eval:base  [partition=cpu time=30min" in r.stdout
    # 2 epochs of 24 training and 24 validation images at 2,750 and 2,500 images/s, 2 evaluations, 2 extractions
    # of 24 images at 50,000/min and 2 scorings at 5 min: docs/reproducing.md's rates
    hours = (2 * (24 / 2750 + 24 / 2500) + 2 * 24 / 2500 + 2 * 24 / (50000 / 60) + 2 * 300) / 3600
    assert lines[-1].startswith(f"2 networks, 8 steps (8 to run, 0 cached); about {hours:,.1f} GPU hours")
    shutil.rmtree(d / "extract")
    (d / "m.pt").unlink()
    r = misbench("study", cfg, "--out", d / "out", "--dry-run")
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code == 1 and len(errors) == 2, r.output
    assert "[extract] data" in errors[0] and "[model] spec" in errors[1] and "m.pt" in errors[1]


def test_manifest_keeps_every_record_of_concurrent_writers(tmp_path):
    path = tmp_path / "manifest.json"
    Manifest(path).save(study="s")
    start = time.time() + 1.5
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_records, args=(path, w, 25, start)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    data = json.loads(path.read_text())
    assert data["study"] == "s"
    assert sorted(data["steps"]) == sorted(f"step-{w}-{i}" for w in range(6) for i in range(25))


@pytest.mark.slow
def test_quick_demo_under_slurm_equals_the_local_run(slurm_cluster, tmp_path):
    """(a) the quick demo config, every step a Slurm job, ends with the local executor's bytes."""
    from misbench.studies.run import demo_config_path

    cfg = tmp_path / "demo.toml"  # the jobs get the local run's thread count (two)
    cfg.write_text(demo_config_path().read_text() + "\n[executor]\ncpus_per_task = 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    local = subprocess.run([sys.executable, "-m", "misbench", "study", str(cfg), "--quick", "--out", "local"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert local.returncode == 0, local.stderr[-2000:]
    r = misbench("study", cfg, "--quick", "--out", tmp_path / "slurm", "--executor", "slurm")
    assert r.exit_code == 0, r.output
    jobs = jobs_of(r.stdout)
    wait_for(slurm_cluster, jobs.values(), timeout=3600)
    r, rows = status(tmp_path / "slurm")
    assert r.exit_code == 0, r.output
    log = (slurm_cluster.log / "slurmctld.log").read_text()
    assert all(starts(log, j) == 1 for j in jobs.values()) and len(jobs) == len(rows)
    for run in (tmp_path / "local" / "runs").iterdir():
        assert (run / "mis.csv").read_bytes() == (tmp_path / "slurm" / "runs" / run.name / "mis.csv").read_bytes()
    assert (tmp_path / "local" / "report" / "sweep.csv").read_bytes() == \
        (tmp_path / "slurm" / "report" / "sweep.csv").read_bytes()
    # summary.json names its inputs by path (runs, header_scores): each study's own folder, the rest must be equal
    summary = [json.loads((tmp_path / o / "report" / "summary.json").read_text().replace(str(tmp_path / o), "<study>"))
               for o in ("local", "slurm")]
    assert summary[0] == summary[1]


@pytest.mark.slow
def test_a_step_given_two_tasks_runs_under_torch_distributed(slurm_cluster, world, tmp_path):
    d = fresh(world, tmp_path)
    cfg = config(d, methods=["structured"], epochs=1, executor={"prune": {"tasks_per_node": 2}})
    out = d / "out"
    jobs = submit(cfg, out)
    wait_for(slurm_cluster, jobs.values())
    r, rows = status(out)
    assert r.exit_code == 0, r.output
    job = jobs["prune:structured-l1-0.5-oneshot"]
    logs = [out / "slurm" / f"{job}_{rank}_log.err" for rank in (0, 1)]
    assert all(log.exists() for log in logs)  # one rank per task, gloo on CPU
    from misbench.models.loading import load_model

    assert load_model(str(out / "runs" / "structured-l1-0.5-oneshot" / "model.pt")).masks


# slow: about a minute of jobs run one at a time (without max_jobs the same study overlaps its jobs: checked once)
@pytest.mark.slow
def test_max_jobs_runs_at_most_that_many_of_the_studys_jobs_at_once(slurm_cluster, world, tmp_path):
    """Two independent prunes and their extractions could run side by side on the two CPUs; `max_jobs = 1` makes
    the study's jobs run one after another (each step's recorded start is at or after every earlier end), and the
    study still completes."""
    d = fresh(world, tmp_path)
    cfg, out = config(d, methods=["unstructured", "structured"], executor={"max_jobs": 1}), d / "out"
    jobs = submit(cfg, out)
    assert len(jobs) >= 4
    wait_for(slurm_cluster, jobs.values())
    r, rows = status(out)
    assert r.exit_code == 0 and set(rows.values()) == {"done"}, r.output
    spans = sorted((e["started_utc"], e["finished_utc"]) for e in steps(out).values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans
