"""A real one-node SLURM cluster on this machine, for the tests: munged, slurmctld and slurmd,
each with its files in one temporary directory, stopped again at teardown.

Nothing global is touched: the munge key, socket and logs, the controller's state and the
node's spool are under ``root``; the ports are free ones picked at start; clients find the
cluster through ``SLURM_CONF`` (in :meth:`env`, which jobs inherit through sbatch). Process
tracking is ``proctrack/linuxproc`` and tasks are not bound (``task/none``): no cgroups, no
accounting database. It needs root (``SlurmUser=root``) and Debian's ``slurm-wlm`` and
``munge`` packages (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel")
NODE = "trainctl-node"
#: How long a requeued job waits before it may start again (AuthInfo's cred_expire; SLURM's
#: default is 120 s, its minimum 5 s).
CRED_EXPIRE_S = 5

SLURM_CONF = """\
ClusterName=trainctl-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=300
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmMissing(RuntimeError):
    """The SLURM or munge binaries are not installed."""


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"

    def env(self) -> dict[str, str]:
        """This environment for this cluster: SLURM_CONF set, any outer job's SLURM_* dropped
        (a CI runner may itself be a SLURM job)."""
        return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SLURM_CONF": str(self.conf)}

    # --- start and stop -------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons: not always on PATH
        found = {name: shutil.which(name, path=sbin if name in DAEMONS else None) for name in (*DAEMONS, *CLIENTS)}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise SlurmMissing(f"{', '.join(missing)} not found: install Debian's slurm-wlm and munge "
                               "(apt-get install -y slurm-wlm munge; .ci/run does it)")
        if os.geteuid() != 0:
            raise SlurmMissing("the SLURM test cluster runs its daemons as root (SlurmUser=root)")
        for folder in ("munge", "state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))  # what `mungekey` makes: 1024 random bytes, owner-only
        key.chmod(0o400)
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, host=socket.gethostname().split(".")[0], node=NODE, cpus=os.cpu_count() or 1,
            ctld_port=free_port(), slurmd_port=free_port(), cred_expire=CRED_EXPIRE_S,
        ))
        # proctrack/linuxproc and task/none use no cgroup; slurmd still reads this file
        (self.root / "cgroup.conf").write_text("# no cgroup plugin is used: proctrack/linuxproc, task/none\n")
        munge = self.root / "munge"
        self._daemon([found["munged"], "--force", f"--socket={munge}/socket", f"--key-file={key}", f"--log-file={munge}/log",
                      f"--pid-file={munge}/pid", f"--seed-file={munge}/seed"])
        self._daemon([found["slurmctld"], "-f", str(self.conf), "-i"])
        self._daemon([found["slurmd"], "-f", str(self.conf), "-N", NODE])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.client("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"the SLURM node is {state or 'not answering'} after {timeout:.0f} s\n{self.logs()}")

    def _daemon(self, argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)  # each forks into the background
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} did not start (exit {done.returncode}): {done.stderr.strip()}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, then end the daemons by their pid files (never by name)."""
        if self.conf.exists():
            self.client("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 15
            while self.client("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.3)
        for pidfile in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "pid"):
            stop_pid(pidfile)

    # --- using it -------------------------------------------------------------------------

    def client(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once it is gone."""
        done = self.client("scontrol", "show", "job", "-o", job_id, check=False)
        if done.returncode != 0:
            return {}
        return dict(field.split("=", 1) for field in done.stdout.split() if "=" in field)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (last lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_pid(pidfile: Path, timeout: float = 10) -> None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
