"""The config's [executor] section: where and with what resources each step of a study runs under Slurm.

Top-level resource keys apply to every step; a table named after a step kind (`[executor.prune]`) overrides
them for that kind. Resources never change a step's outputs, so they are not part of any step's key."""

__all__ = ["JobResources", "ExecutorSettings", "ExecutorSection", "parse_executor", "EXECUTOR_SECTION", "STEP_KINDS"]

import dataclasses

from ..errors import MisbenchError
from ..runtime.schema import check_table, section_defaults, setting

STEP_KINDS = ("train", "init", "prune", "eval", "extract", "dictionary", "score", "report")


# sbatch options that have their own key, and those misbench sets itself (dependencies, logs, requeue, signals)
OWN_KEYS = {"time": "time_min", "mem": "mem_gb", "partition": "partition", "account": "account", "qos": "qos",
            "nodes": "nodes", "ntasks-per-node": "tasks_per_node", "gpus-per-node": "gpus_per_node",
            "cpus-per-task": "cpus_per_task"}
OWN_OPTIONS = {"dependency", "kill-on-invalid-dep", "job-name", "output", "error", "open-mode", "signal", "requeue",
               "no-requeue", "array", "wrap", *OWN_KEYS}


def _check_sbatch(options: dict) -> None:
    for option, value in options.items():
        name = option.lstrip("-")
        if name in OWN_OPTIONS:
            fix = f"use the key {OWN_KEYS[name]}" if name in OWN_KEYS else "misbench sets it itself"
            raise MisbenchError(f"{option!r} cannot be given here ({fix})")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise MisbenchError(f"sbatch {option}: expected a string or an integer, got {value!r}")


# The resource keys of [executor] and of each step kind's table (misbench/runtime/schema.py: types, bounds, checks)
@dataclasses.dataclass(frozen=True)
class JobResources:
    """One Slurm job's request (sbatch's options of the same names)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = setting(1440, low=1)          # --time, minutes
    nodes: int = setting(1, low=1)
    tasks_per_node: int = setting(1, low=1)       # > 1 (or nodes > 1): the step runs under torch.distributed
    gpus_per_node: int = setting(0, low=0)
    cpus_per_task: int = setting(1, low=1)
    mem_gb: int | None = setting(None, low=1)     # None: the partition's default
    # further sbatch options, {"constraint": "a100"}
    sbatch: dict = setting(default_factory=dict, check=_check_sbatch)

    @property
    def distributed(self) -> bool:
        return self.nodes * self.tasks_per_node > 1

    def describe(self) -> str:
        parts = [f"partition={self.partition or '(default)'}", f"time={self.time_min}min", f"nodes={self.nodes}",
                 f"tasks/node={self.tasks_per_node}", f"gpus/node={self.gpus_per_node}", f"cpus/task={self.cpus_per_task}"]
        parts += [f"{k}={v}" for k, v in (("mem", f"{self.mem_gb}G" if self.mem_gb else None), ("account", self.account),
                                          ("qos", self.qos)) if v]
        parts += [f"{k}={v}" for k, v in sorted(self.sbatch.items())]
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class ExecutorSettings:
    default: JobResources = JobResources()
    kinds: dict = dataclasses.field(default_factory=dict)  # step kind -> JobResources
    max_jobs: int | None = None  # the most of the study's jobs queued to run at once (None: no limit)

    def resources(self, kind: str) -> JobResources:
        return self.kinds.get(kind, self.default)

    def partitions(self) -> set:
        return {r.partition for r in [self.default, *self.kinds.values()] if r.partition}


RESOURCE_KEYS = [f.name for f in dataclasses.fields(JobResources)]
# the section: the resource keys for every step, max_jobs, and a table of resource keys per step kind
ExecutorSection = dataclasses.make_dataclass(
    "ExecutorSection", [("max_jobs", int | None, setting(None, low=1)),
                        *[(kind, dict, setting(default_factory=dict, expected=f"a table of resources ([executor.{kind}])"))
                          for kind in STEP_KINDS]],
    bases=(JobResources,), frozen=True)
EXECUTOR_SECTION = section_defaults(ExecutorSection)


def _resources(base: JobResources, given: dict) -> JobResources:
    sbatch = {**base.sbatch, **{k.lstrip("-"): v for k, v in given.get("sbatch", {}).items()}}
    return dataclasses.replace(base, **{**given, "sbatch": sbatch})


def parse_executor(section: dict) -> ExecutorSettings:
    """The checked [executor] section (its keys already merged with EXECUTOR_SECTION's defaults or not; a key
    given as None keeps its default)."""
    given = {k: v for k, v in section.items() if v is not None}
    check_table(ExecutorSection, given, "[executor]", " (a step kind's table overrides the resources for that kind)")
    default = _resources(JobResources(), {k: v for k, v in given.items() if k in RESOURCE_KEYS})
    kinds = {}
    for kind in STEP_KINDS:
        table = given.get(kind) or {}
        if table:
            check_table(JobResources, table, f"[executor.{kind}]")
            kinds[kind] = _resources(default, table)
    return ExecutorSettings(default, kinds, given.get("max_jobs"))
