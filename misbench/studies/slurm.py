"""`misbench study --executor slurm`: every pending step of a study as one Slurm job (through submitit).

A job runs its one step with Study.run_step, the code the local executor runs in its loop, so the outputs are the
same bytes. Jobs wait (`afterok`) for the jobs that produce their inputs; one that fails takes its dependants
with it (`--kill-on-invalid-dep=yes`: Slurm cancels them, they never sit pending). SIGTERM or SIGUSR2 (pre-emption,
the time limit's warning) stop a step at its next safe point (a finished epoch, a committed batch); the job then
requeues itself and resumes from the partial, unless the study was cancelled. The manifest is the single truth:
each job records its own step in it (studies/manifest.py: locked read-modify-write), and `study status` reads it,
asking squeue only about the jobs that have recorded no end."""

__all__ = ["submit_study", "run_job", "study_status", "cancel_study", "JOB_FOLDER"]

import dataclasses
import datetime
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from ..errors import MisbenchError
from ..runtime import distributed
from ..runtime.device import resolve_device
from ..runtime.fileio import utc_now
from ..runtime.lock import DirectoryLock
from .config import StudyConfig
from .manifest import Manifest, manifest_path
from .queue import (ACTIVE_STATES, ENDED_STATUSES, FAILED_STATES, cancel_jobs, cluster_partitions, queue_states,
                    refuse_active_jobs, require_command)
from .run import Study

JOB_FOLDER = "slurm"  # the study folder's subfolder for submitit's job files and the jobs' logs


def _submitit():
    try:
        # submitit is the optional `misbench[slurm]` extra: imported only to submit
        import submitit
    except ImportError:
        raise MisbenchError("--executor slurm needs submitit: pip install 'misbench[slurm]'") from None
    return submitit


def _parameters(resources, name: str, dependency: str | None) -> dict:
    extra = {"requeue": True, "hold": True, **resources.sbatch}
    if dependency:
        extra.update(dependency=dependency, **{"kill-on-invalid-dep": "yes"})
    params = {"job_name": name, "time": resources.time_min, "nodes": resources.nodes,
              "ntasks_per_node": resources.tasks_per_node, "cpus_per_task": resources.cpus_per_task,
              "additional_parameters": extra}
    for key, value in (("partition", resources.partition), ("account", resources.account), ("qos", resources.qos),
                       ("gpus_per_node", resources.gpus_per_node or None),
                       ("mem", f"{resources.mem_gb}G" if resources.mem_gb else None)):
        if value is not None:
            params[key] = value
    return params


def _check_partitions(settings) -> None:
    known = cluster_partitions()
    for partition in sorted(settings.partitions()):
        if partition not in known:
            raise MisbenchError(f"config [executor] partition {partition!r} is not a partition of this cluster (sinfo "
                                f"lists {', '.join(sorted(known)) or 'none'}): set [executor] partition to one of them")


def _dependencies(study: Study, jobs: dict, order: list, max_jobs: int | None, step) -> str | None:
    producers = {path: s.name for s in study.steps for path in s.outputs.values()}
    if step.kind == "report":  # the report comes last, after every other job of the study
        after = set(jobs.values())
    else:
        after = {jobs[producers[p]] for p in step.inputs.values() if isinstance(p, Path) and producers.get(p) in jobs}
    parts = [f"afterok:{':'.join(sorted(after, key=int))}"] if after else []
    if max_jobs and len(order) >= max_jobs:  # a window over the submission order: at most max_jobs at once
        parts.append(f"afterany:{order[len(order) - max_jobs]}")
    return ",".join(parts) or None


def plan_jobs(study: Study) -> list[tuple]:
    """(step, status, resources) for the plan: what `--dry-run` shows and what is submitted."""
    settings = study.config.executor()
    status = dict(study.plan())
    return [(step, status[step.name], settings.resources(step.kind)) for step in study.steps]


def submit_study(study: Study) -> dict:
    """Submit every step the plan runs as one held job, then release them all: either every pending step is
    queued, or none is (the ones already submitted are cancelled and named). Returns {step: job id}."""
    out = study.out
    submitit = _submitit()
    require_command("sbatch")
    require_command("srun")
    settings = study.config.executor()
    _check_partitions(settings)
    executor = submitit.SlurmExecutor(folder=out / JOB_FOLDER)
    with DirectoryLock(out, "misbench study submitter"):
        manifest = Manifest(manifest_path(out))
        refuse_active_jobs(manifest.data, out)
        manifest.save(study=study.config["study"]["name"], config=study.config.raw,
                      config_source=study.config.source)
        planned = [(step, res) for step, status, res in plan_jobs(study) if status == "run"]
        jobs, order, logs = {}, [], {}
        try:
            for step, resources in planned:
                dependency = _dependencies(study, jobs, order, settings.max_jobs, step)
                executor.update_parameters(**_parameters(resources, f"misbench:{step.name}", dependency))
                job = executor.submit(run_job, study.config.raw, study.config.source, str(out), step.name)
                jobs[step.name] = str(job.job_id)
                order.append(str(job.job_id))
                logs[step.name] = str(job.paths.stderr)
        except BaseException as err:
            cancel_jobs(jobs.values())
            named = ", ".join(f"{j} ({n})" for n, j in jobs.items()) or "none"
            raise MisbenchError(f"submitting step {step.name} failed ({type(err).__name__}: "
                                f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}); nothing was "
                                f"queued (cancelled the jobs already submitted: {named}): fix it and run the "
                                "command again") from None
        now = utc_now()

        def submitted(data):
            for step, resources in planned:
                entry = data["steps"].get(step.name, {})
                # a failed or cancelled attempt's fields go; the key stays (a partial it matches is resumed)
                entry = {k: v for k, v in entry.items() if k not in ("error", "traceback", "node", "cancelled_utc",
                                                                      "requeues", "finished_utc")}
                data["steps"][step.name] = {**entry, "kind": step.kind, "status": "submitted", "executor": "slurm",
                                            "job_id": jobs[step.name], "log": logs[step.name], "submitted_utc": now,
                                            "resources": dataclasses.asdict(resources)}
        manifest.update(submitted)
        if order:
            release = subprocess.run(["scontrol", "release", ",".join(order)], capture_output=True, text=True)
            if release.returncode != 0:
                cancel_jobs(order)
                raise MisbenchError(f"scontrol release failed ({release.stderr.strip()}); cancelled jobs "
                                    f"{', '.join(order)}: run the command again")
    return jobs


# -- inside a job -------------------------------------------------------------------------------------------------
def _stop(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _slurm_rank() -> tuple[int, int]:
    """Export torch.distributed's variables from Slurm's (one rank per task) and return (rank, world size)."""
    world = int(os.environ.get("SLURM_NTASKS", "1"))
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    if world > 1:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
                          MASTER_ADDR=nodes[0], MASTER_PORT=str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
    return rank, world


def run_job(raw: dict, source: str, out: str, step_name: str) -> str:
    """The body of one Slurm job: run `step_name` of the study, record it, requeue on SIGTERM/SIGUSR2."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_CPUS_PER_TASK"):  # the threads the job was given, not every core of the node
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    study = Study(StudyConfig(raw, source), out)
    step = study.step(step_name)
    rank, world = _slurm_rank()
    manifest = Manifest(manifest_path(out), read_only=rank != 0)
    for signum in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, _stop)
    try:
        prepared = study.prepare_step(manifest, step) if rank == 0 else None
        if world > 1:
            distributed.ensure_initialized(resolve_device(study._runtime()["device"]))
            prepared = distributed.broadcast_object(prepared)
        if prepared is None:  # its inputs came out the same bytes as before: the recorded outputs are current
            manifest.record(step.name, status="done", job_id=job_id)
            return "cached"
        study.run_step(manifest, step, prepared=prepared, job_id=job_id, node=socket.gethostname(),
                       log=_job_log(out, job_id))
    except KeyboardInterrupt as stop:
        if rank == 0:
            _requeue_or_cancel(manifest, step.name, job_id, str(stop))
        sys.exit(3)
    return "done"


def _job_log(out, job_id: str) -> str:
    return str(Path(out) / JOB_FOLDER / f"{job_id}_0_log.err")


def _requeue_or_cancel(manifest: Manifest, name: str, job_id: str, signal_name: str) -> None:
    data = manifest.refresh()
    state = queue_states([job_id]).get(job_id, {}).get("state")
    if job_id in data.get("cancelled_jobs", []) or state == "CANCELLED":
        manifest.record(name, status="cancelled", cancelled_utc=utc_now())
        return
    requeues = (manifest.entry(name) or {}).get("requeues", 0) + 1
    manifest.record(name, status="requeued", requeues=requeues, requeued_utc=utc_now(), stopped_by=signal_name)
    subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)


# -- status and cancel --------------------------------------------------------------------------------------------
def _order(out: Path, data: dict) -> list[str]:
    names = list(data.get("steps", {}))
    if data.get("config"):
        try:
            names = [s.name for s in Study(StudyConfig(data["config"], data.get("config_source", "")), out).steps]
        except MisbenchError:  # a config this version no longer reads: the manifest's own order
            pass
    return names


def _clock(seconds) -> str:
    return str(datetime.timedelta(seconds=int(seconds or 0)))


def study_status(out_dir) -> dict:
    """One record per step: state (done, pending, running, failed, cancelled, lost, not submitted), job id, node,
    elapsed, log; and the counts. Jobs Slurm no longer knows that recorded no end are `lost`."""
    out = Path(out_dir)
    path = manifest_path(out)
    if not path.exists():
        raise MisbenchError(f"{out} has no manifest.json: give the --out folder of a `misbench study` run")
    data = Manifest(path).data
    steps = data["steps"]
    cancelled = set(data.get("cancelled_jobs", []))
    open_jobs = [e["job_id"] for e in steps.values() if e.get("job_id") and e.get("status") not in ENDED_STATUSES]
    queue = queue_states(open_jobs) if open_jobs else {}
    rows = []
    for name in _order(out, data):
        e = steps.get(name)
        row = {"step": name, "job_id": (e or {}).get("job_id", ""), "node": (e or {}).get("node", ""),
               "elapsed": _clock((e or {}).get("seconds")), "log": (e or {}).get("log", ""), "reason": ""}
        if e is None:
            row["state"] = "not submitted"
        elif e.get("status") in ENDED_STATUSES:
            row["state"] = e["status"]
            row["reason"] = (e.get("error") or "").splitlines()[0] if e.get("error") else ""
        elif not e.get("job_id"):  # a local run that stopped
            row["state"] = e.get("status", "")
        else:
            q = queue.get(str(e["job_id"]))
            state = q["state"] if q else None
            if state in ("RUNNING", "COMPLETING", "CONFIGURING"):
                row.update(state="running", node=q["node"], elapsed=q["elapsed"])
            elif state in ACTIVE_STATES:
                row.update(state="pending", reason=q["reason"])
            elif state == "CANCELLED" or str(e["job_id"]) in cancelled:
                row.update(state="cancelled", reason=(q or {}).get("reason", "cancelled"))
            elif state in FAILED_STATES or state == "COMPLETED":
                row.update(state="failed", reason=f"Slurm: {state}")
            else:
                row.update(state="lost", reason="Slurm no longer knows this job and it recorded no end")
        rows.append(row)
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"steps": rows, "counts": counts}


def cancel_study(out_dir) -> list[str]:
    """Cancel the study's queued and running jobs; the manifest names them first, so that a running job's SIGTERM
    ends it instead of requeueing it. Returns the job ids."""
    out = Path(out_dir)
    if not manifest_path(out).exists():
        raise MisbenchError(f"{out} has no manifest.json: give the --out folder of a `misbench study` run")
    manifest = Manifest(manifest_path(out))
    jobs = {}

    def mark(data):
        now = utc_now()
        for name, e in data["steps"].items():
            if e.get("job_id") and e.get("status") not in ENDED_STATUSES:
                jobs[name] = str(e["job_id"])
                e.update(status="cancelled", cancelled_utc=now)
        data["cancelled_jobs"] = sorted(set(data.get("cancelled_jobs", [])) | set(jobs.values()), key=int)
    manifest.update(mark)
    cancel_jobs(jobs.values())
    return sorted(jobs.values(), key=int)
