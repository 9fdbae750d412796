"""Run a study with one of the executors: `local` (every step in this process, in order) or `slurm` (every
pending step as one Slurm job); and the dry run: the plan, each step's resources, the estimate and the checks."""

__all__ = ["EXECUTORS", "launch_study", "dry_run"]

from ..errors import MisbenchError, close_matches
from .config import StudyConfig
from .dictionaries import feature_problems, grid_problems
from .estimate import missing_inputs, study_estimate
from .run import Study, run_study
from .slurm import plan_jobs, submit_study


def _local(config: StudyConfig, out_dir, on_step=None, progress=None) -> dict:
    return run_study(config, out_dir, on_step=on_step, progress=progress)


def _slurm(config: StudyConfig, out_dir, on_step=None, progress=None) -> dict:
    study = Study(config, out_dir)
    return {"jobs": submit_study(study), "manifest": str(study.out / "manifest.json")}


# executor name -> run(config, out_dir, on_step, progress); `--executor` offers these
EXECUTORS = {"local": _local, "slurm": _slurm}


def check_executor(name: str) -> None:
    if name not in EXECUTORS:
        raise MisbenchError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}.{close_matches(name, EXECUTORS)}")


def dry_run(config: StudyConfig, out_dir, executor: str = "local") -> dict:
    """The plan [(step, status)], each step's resources under `executor`, the estimate and the missing inputs."""
    check_executor(executor)
    study = Study(config, out_dir)
    jobs = plan_jobs(study)
    plan = [(step.name, status) for step, status, _ in jobs]
    resources = {step.name: res.describe() for step, _, res in jobs} if executor == "slurm" else {}
    return {"plan": plan, "resources": resources, "estimate": study_estimate(study, dict(plan)),
            "problems": missing_inputs(config) + grid_problems(config) + feature_problems(config)}


def launch_study(config: StudyConfig, out_dir, executor: str = "local", on_step=None, progress=None) -> dict:
    check_executor(executor)
    return EXECUTORS[executor](config, out_dir, on_step=on_step, progress=progress)
