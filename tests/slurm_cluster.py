"""A real one-node Slurm cluster for the tests: Debian's ``munge`` and ``slurm-wlm``, in a folder of its own.

:class:`SlurmCluster` writes a ``slurm.conf`` for this machine as a single node with ``cpus`` CPUs, a munge
key, and starts ``munged``, ``slurmctld`` and ``slurmd`` on free loopback ports, every file (state,
spool, logs, sockets) under its folder, so nothing of the host's ``/etc/slurm`` is read or changed
and two clusters never meet. No cgroups are needed (``proctrack/linuxproc``, ``task/none``). Jobs
are submitted with the real ``sbatch`` with ``SLURM_CONF`` pointing at this configuration
(:meth:`SlurmCluster.env`); :meth:`SlurmCluster.stop` cancels what still runs and stops the daemons.

A requeued job waits about two minutes before Slurm starts it again (its ``BeginTime``);
:meth:`SlurmCluster.release` starts it at once, as ``scontrol update StartTime=now`` lets an
administrator do, so that a test of a requeue takes seconds. ``KillWait`` (SIGTERM to SIGKILL) is
Slurm's default, 30 s.

Run by hand: ``python tests/slurm_cluster.py DIR`` starts one and prints the ``SLURM_CONF`` line to use
until Enter is pressed.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "srun", "scontrol", "scancel", "squeue")


def missing() -> str | None:
    """Why a cluster cannot start on this machine (a program that is not installed), or None."""
    absent = [name for name in (*DAEMONS, *COMMANDS) if shutil.which(name) is None]
    return f"Slurm is not installed ({', '.join(absent)} missing: apt-get install slurm-wlm munge)" if absent else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """slurmctld + slurmd + munged for one node (this machine) with ``cpus`` CPUs, under ``folder``.

    ``cpus`` may be more than the machine has (``config_overrides``): jobs that mostly wait can then
    run side by side."""

    def __init__(self, folder: Path, cpus: int = 2) -> None:
        self.folder = folder.absolute()
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.socket"
        self.user = pwd.getpwuid(os.getuid()).pw_name  # the daemons run as the user running the tests
        self._processes: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for ``sbatch``, ``scontrol`` ... of this cluster, and for its jobs (sbatch passes it on):
        this Python's folder first on ``PATH``, so that a job's ``tiny-audio`` is the one under test."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # never a job's own
        path = os.pathsep.join([str(Path(sys.executable).parent), extra.pop("PATH", os.environ.get("PATH", ""))])
        return {**clean, **extra, "PATH": path, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder / "munge", 0o700)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(f"""\
ClusterName=tinyaudio
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.folder / "state"}
SlurmdSpoolDir={self.folder / "spool"}
SlurmctldPidFile={self.folder / "slurmctld.pid"}
SlurmdPidFile={self.folder / "slurmd.pid"}
SlurmctldLogFile={self.folder / "log" / "slurmctld.log"}
SlurmdLogFile={self.folder / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=60
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Start the daemons; return once the node takes jobs, or raise with their logs after ``timeout`` s."""
        self._write_config()
        munge = self.folder / "munge"
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={self.folder / 'log' / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not open its socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(lambda: re.search(r"State=IDLE", self.scontrol("show", "node", self.node, check=False)),
                   timeout, "the node did not become idle")
        return self

    def _spawn(self, command: list[str]) -> None:
        log = open(self.folder / "log" / f"{command[0]}.out", "ab")
        self._processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                                start_new_session=True))
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self._processes):
                break
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Slurm: {what} within {timeout:.0f} s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        """The end of each daemon's log, for failure messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted((self.folder / "log").glob("*")) if p.is_file())

    def scontrol(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["scontrol", *args], env=self.env(), capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (``JobState``, ``Restarts``, ``ExitCode`` ...)."""
        text = self.scontrol("show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll the job until its state is one of ``states``; its fields, or an error with the logs."""
        deadline = time.monotonic() + timeout
        fields = self.job(job_id)
        while fields.get("JobState") not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s "
                                   f"(waiting for {sorted(states)})")
            time.sleep(0.5)
            fields = self.job(job_id)
        return fields

    def release(self, job_id: str) -> None:
        """Start a requeued job now instead of after Slurm's requeue delay."""
        self.scontrol("update", f"JobId={job_id}", "StartTime=now")

    def stop(self) -> None:
        """Kill every job (SIGKILL to its steps and batch shell; slurmstepd outlives the daemons otherwise), wait
        until Slurm has let them go, then stop the daemons (SIGTERM, SIGKILL after 10 s)."""
        if any(p.poll() is None for p in self._processes):
            subprocess.run(["scancel", "--signal=KILL", "--full", "--user", self.user], env=self.env(),
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "--noheader", "--user", self.user], env=self.env(), capture_output=True, text=True,
                    timeout=30).stdout.strip():
                time.sleep(0.5)
        for process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._processes = []

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with SlurmCluster(Path(sys.argv[1])) as cluster:
        print(f"export SLURM_CONF={cluster.conf}")
        input("Enter stops the cluster ")
