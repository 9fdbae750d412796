"""What Slurm says about a study's jobs: squeue, scontrol, scancel and sinfo, called as commands.

`misbench study status` reads the manifest (which each job writes itself) and asks squeue only about the jobs
that have not recorded an end. squeue needs no accounting database (sacct does: without slurmdbd it answers
that accounting storage is disabled), so status works on every Slurm cluster."""

__all__ = ["queue_states", "refuse_active_jobs", "active_jobs", "cancel_jobs", "cluster_partitions", "require_command",
           "ACTIVE_STATES", "FAILED_STATES", "ENDED_STATUSES"]

import shutil
import subprocess

from ..errors import MisbenchError

# squeue's long state names: still to run (or running), and ended without success
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
FAILED_STATES = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# manifest statuses a job writes when its step has ended for good
ENDED_STATUSES = {"done", "failed", "cancelled"}


def require_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MisbenchError(f"--executor slurm: `{name}` is not on PATH: run this on a Slurm login node (or put "
                            "Slurm's client commands on PATH), or use --executor local")
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    require_command(args[0])
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def queue_states(job_ids) -> dict:
    """job id -> {"state", "node", "elapsed", "reason"} for the jobs Slurm still knows (finished ones stay known
    for MinJobAge, 300 s by default); unknown ids are absent."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    r = _run(["squeue", "--noheader", "--states=all", "--jobs", ",".join(ids), "--format=%i|%T|%N|%M|%r"])
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        raise MisbenchError(f"squeue failed ({r.stderr.strip() or r.returncode}): check that Slurm answers "
                            "(`squeue`), then run the command again")
    states = {}
    for line in r.stdout.splitlines():
        job, state, node, elapsed, reason = (line.split("|") + [""] * 5)[:5]
        states[job.strip()] = {"state": state.strip(), "node": node.strip(), "elapsed": elapsed.strip(),
                               "reason": reason.strip()}
    if r.returncode != 0 and len(ids) > 1:  # an unknown id can fail the whole list: ask about each alone
        for job in ids:
            states.update(queue_states([job]))
    return states


def active_jobs(manifest_data: dict) -> dict:
    """step -> job id of the study's jobs that are queued or running (Slurm's word, not the manifest's)."""
    candidates = {name: e["job_id"] for name, e in manifest_data.get("steps", {}).items()
                  if e.get("job_id") and e.get("status") not in ENDED_STATUSES}
    if not candidates or shutil.which("squeue") is None:
        return {}
    states = queue_states(candidates.values())
    return {name: job for name, job in candidates.items() if states.get(str(job), {}).get("state") in ACTIVE_STATES}


def refuse_active_jobs(manifest_data: dict, out_dir) -> None:
    active = active_jobs(manifest_data)
    if active:
        jobs = ", ".join(f"{job} ({name})" for name, job in sorted(active.items(), key=lambda kv: int(kv[1])))
        raise MisbenchError(f"{out_dir} has Slurm jobs queued or running: {jobs}; wait for them (`misbench study "
                            f"status {out_dir}`) or cancel them (`misbench study cancel {out_dir}`) first")


def cancel_jobs(job_ids) -> None:
    ids = sorted({str(j) for j in job_ids if j}, key=int)
    if ids:
        r = _run(["scancel", *ids])
        if r.returncode != 0 and "Invalid job id" not in r.stderr:
            raise MisbenchError(f"scancel {' '.join(ids)} failed ({r.stderr.strip()}): cancel them by hand")


def cluster_partitions() -> set:
    r = _run(["sinfo", "--noheader", "--format=%R"])
    if r.returncode != 0:
        raise MisbenchError(f"sinfo failed ({r.stderr.strip() or r.returncode}): check that Slurm answers (`sinfo`)")
    return {line.strip() for line in r.stdout.splitlines() if line.strip()}
