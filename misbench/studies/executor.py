"""The config's [executor] section: where and with what resources each step of a study runs under Slurm.

Top-level resource keys apply to every step; a table named after a step kind (`[executor.prune]`) overrides
them for that kind. Resources never change a step's outputs, so they are not part of any step's key."""

__all__ = ["JobResources", "ExecutorSettings", "parse_executor", "EXECUTOR_SECTION", "STEP_KINDS"]

import dataclasses

from ..errors import MisbenchError

STEP_KINDS = ("train", "init", "prune", "eval", "extract", "dictionary", "score", "report")


@dataclasses.dataclass(frozen=True)
class JobResources:
    """One Slurm job's request (sbatch's options of the same names)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 1440          # --time, minutes
    nodes: int = 1
    tasks_per_node: int = 1       # > 1 (or nodes > 1): the step runs under torch.distributed, one rank per task
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int | None = None     # None: the partition's default
    sbatch: dict = dataclasses.field(default_factory=dict)  # further sbatch options, {"constraint": "a100"}

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


RESOURCE_TYPES = {"partition": str, "account": str, "qos": str, "time_min": int, "nodes": int, "tasks_per_node": int,
                  "gpus_per_node": int, "cpus_per_task": int, "mem_gb": int, "sbatch": dict}
MINIMUM = {"time_min": 1, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1,
           "max_jobs": 1}
# sbatch options that have their own key, and those misbench sets itself (dependencies, logs, requeue, signals)
OWN_KEYS = {"time": "time_min", "mem": "mem_gb", "partition": "partition", "account": "account", "qos": "qos",
            "nodes": "nodes", "ntasks-per-node": "tasks_per_node", "gpus-per-node": "gpus_per_node",
            "cpus-per-task": "cpus_per_task"}
OWN_OPTIONS = {"dependency", "kill-on-invalid-dep", "job-name", "output", "error", "open-mode", "signal", "requeue",
               "no-requeue", "array", "wrap", *OWN_KEYS}
# the section's keys and defaults, in config.SECTIONS' style (a kind's table takes the resource keys)
EXECUTOR_SECTION = {**{f.name: f.default if f.default is not dataclasses.MISSING else {}
                       for f in dataclasses.fields(JobResources)}, "max_jobs": None, **{k: {} for k in STEP_KINDS}}


def _check_value(where: str, key: str, value, expected: type):
    ok = isinstance(value, expected) and not isinstance(value, bool)
    if not ok:
        names = {int: "an integer", str: "a string", dict: "a table"}
        raise MisbenchError(f"config {where} {key}: expected {names[expected]}, got {value!r} ({type(value).__name__})")
    if key in MINIMUM and value < MINIMUM[key]:
        raise MisbenchError(f"config {where} {key}: must be at least {MINIMUM[key]}, got {value!r}")
    if key == "sbatch":
        for option, v in value.items():
            name = option.lstrip("-")
            if name in OWN_OPTIONS:
                fix = f"use the key {OWN_KEYS[name]}" if name in OWN_KEYS else "misbench sets it itself"
                raise MisbenchError(f"config {where} sbatch: {option!r} cannot be given here ({fix})")
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise MisbenchError(f"config {where} sbatch {option}: expected a string or an integer, got {v!r}")


def _resources(where: str, given: dict, base: JobResources) -> JobResources:
    unknown = sorted(set(given) - set(RESOURCE_TYPES))
    if unknown:
        raise MisbenchError(f"config {where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(RESOURCE_TYPES))}")
    for key, value in given.items():
        _check_value(where, key, value, RESOURCE_TYPES[key])
    sbatch = {**base.sbatch, **{k.lstrip("-"): v for k, v in given.get("sbatch", {}).items()}}
    return dataclasses.replace(base, **{**given, "sbatch": sbatch})


def parse_executor(section: dict) -> ExecutorSettings:
    """The checked [executor] section (its keys already merged with EXECUTOR_SECTION's defaults or not)."""
    allowed = set(EXECUTOR_SECTION)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise MisbenchError(f"config [executor]: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))} "
                            f"(a step kind's table overrides the resources for that kind)")
    defaults = {k: section[k] for k in RESOURCE_TYPES if k in section and section[k] is not None
                and section[k] != EXECUTOR_SECTION[k]}
    default = _resources("[executor]", defaults, JobResources())
    kinds = {}
    for kind in STEP_KINDS:
        table = section.get(kind) or {}
        if not isinstance(table, dict):
            raise MisbenchError(f"config [executor] {kind}: expected a table of resources ([executor.{kind}]), "
                                f"got {table!r}")
        if table:
            kinds[kind] = _resources(f"[executor.{kind}]", table, default)
    max_jobs = section.get("max_jobs")
    if max_jobs is not None:
        _check_value("[executor]", "max_jobs", max_jobs, int)
    return ExecutorSettings(default, kinds, max_jobs)
