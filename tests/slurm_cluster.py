"""A real single-node Slurm for the tests: munged, slurmctld and slurmd (Debian's packages, installed by
scripts/ensure-slurm.sh) with a generated slurm.conf in a temporary folder, on free ports, so that several
clusters (several engineers' test runs) can share one machine. Stopped by their PIDs."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# a job step credential's lifetime, and so how long a requeued job waits before it starts again (Slurm's
# default: 120 s). Starting it sooner fails with "Job credential revoked", so tests wait this long instead.
CRED_EXPIRE = 15

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def missing_commands() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return max(1024, total_kb // 1024 - 1024)


class Cluster:
    """`env` carries SLURM_CONF for the client commands (sbatch inherits it into the jobs)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.log = self.root / "log"
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname()
        self.cpus = os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        r = self.root
        munge = r / "munge"
        self.conf.write_text(f"""\
ClusterName=misbench-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/socket,cred_expire={CRED_EXPIRE}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={self.log}/slurmctld.log
SlurmdLogFile={self.log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60) -> "Cluster":
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.write_conf()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={m}/socket", f"--key-file={key}",
                               f"--log-file={self.log}/munged.log", f"--pid-file={m}/munged.pid",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: (m / "socket").exists(), timeout, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "--noheader", "--format=%T").stdout.strip() == "idle", timeout,
                   "the node to be idle")
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.log / f"{name}.stdout", "wb")
        self.procs.append(subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, preexec_fn=_end_with_parent))
        out.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Slurm daemon exited while waiting for {what}: {self.tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {self.tail()}")

    def tail(self) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-600:]}" for p in sorted(self.log.glob("*")) if p.is_file())

    def run(self, *args, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def queue(self) -> list[str]:
        """Job ids squeue lists as pending or running."""
        for _ in range(5):  # a busy slurmctld may time out an answer: an empty list must mean an empty queue
            r = self.run("squeue", "--noheader", "--format=%i")
            if r.returncode == 0:
                return r.stdout.split()
            time.sleep(1)
        raise RuntimeError(f"squeue failed 5 times: {r.stderr.strip()}")

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.queue():
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        """Cancel every job (so that no slurmstepd outlives slurmd), then stop the daemons by their PIDs."""
        if self.procs and all(p.poll() is None for p in self.procs):
            self.run("scancel", "--user", str(os.getuid()))
            self.wait_idle(30)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []


def _end_with_parent() -> None:
    """In the daemon's child process before exec: SIGTERM it when the process that started it dies, so that a
    killed test run (no fixture teardown) leaves no Slurm running (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

