"""A real one-node SLURM cluster for the tests that submit jobs with ``sbatch``: munged,
slurmctld and slurmd from the Debian packages, started from a temporary config and state
directory with a few CPU slots, and helpers to wait for jobs.

The node is named after this machine's host name (as on a real cluster), so a job script
that takes ``MASTER_ADDR`` from ``scontrol show hostnames`` gets a name that resolves.
Tests that use it are skipped, with the reason, where the packages are not installed
(``.ci/run`` installs them) or the tests do not run as root (slurmd starts jobs as their
owner): put :data:`SKIP_UNLESS_SLURM` in their ``pytestmark``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.launch import free_port

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo", "squeue")
SLOTS = 3
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def missing() -> str | None:
    """Why a cluster cannot start here, None when it can."""
    absent = [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]
    if absent:
        return (f"SLURM/munge not installed ({', '.join(absent)} missing): "
                "apt-get install -y slurmctld slurmd munge slurm-client (.ci/run does)")
    if os.geteuid() != 0:
        return "needs root: slurmd runs the jobs as their owner"
    return None


SKIP_UNLESS_SLURM = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def exe(name: str) -> str:
    """Path of a SLURM/munge command (the daemons live in /usr/sbin, often not on PATH)."""
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _conf(root: Path, host: str, slots: int) -> str:
    return f"""ClusterName=smaetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={slots} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def cluster(slots: int = SLOTS) -> Iterator[dict[str, str]]:
    """Start the daemons, wait until the node is idle, yield the environment the clients
    (sbatch, squeue, ...) need; stop the daemons and remove the state on exit."""
    root = Path(tempfile.mkdtemp(prefix="smae-slurm-"))  # short: the munge socket path has a length limit
    procs: list[subprocess.Popen] = []
    daemons_log = root / "log" / "daemons.out"
    try:
        for d in ("munge", "state", "spool", "log"):
            (root / d).mkdir()
        root.chmod(0o755)
        (root / "munge").chmod(0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = socket.gethostname().split(".")[0]
        conf = root / "slurm.conf"
        conf.write_text(_conf(root, host, slots))
        env = dict(os.environ, SLURM_CONF=str(conf))
        with open(daemons_log, "wb") as logs:
            procs.append(subprocess.Popen(
                [exe("munged"), "-F", "-f", f"--key-file={key}", f"--socket={root}/munge/munge.sock",
                 f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
                 f"--seed-file={root}/munge/seed"], stdout=logs, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 20
            while not (root / "munge" / "munge.sock").exists():
                assert time.monotonic() < deadline, daemons_log.read_text()
                time.sleep(0.1)
            procs.append(subprocess.Popen([exe("slurmctld"), "-D", "-i", "-f", str(conf)], env=env, stdout=logs,
                                          stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen([exe("slurmd"), "-D", "-N", host, "-f", str(conf)], env=env,
                                          stdout=logs, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        state = ""
        while state != "idle":
            assert all(p.poll() is None for p in procs), daemons_log.read_text()
            assert time.monotonic() < deadline, f"node state {state!r}\n" + daemons_log.read_text()
            time.sleep(0.5)
            res = subprocess.run([exe("sinfo"), "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            state = res.stdout.strip()
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def job_state(env: dict[str, str], job: str) -> str:
    """The states of a job's tasks, comma-joined (one for a plain job)."""
    res = subprocess.run([exe("scontrol"), "show", "job", job], env=env, capture_output=True, text=True)
    states = re.findall(r"JobState=(\S+)", res.stdout)
    return ",".join(sorted(set(states))) or f"unknown ({res.stderr.strip()})"


def job_field(env: dict[str, str], job: str, name: str) -> str:
    """One ``Name=value`` field of ``scontrol show job`` (e.g. ExitCode -> "0:0")."""
    res = subprocess.run([exe("scontrol"), "show", "job", job], env=env, capture_output=True, text=True)
    m = re.search(rf"\b{name}=(\S+)", res.stdout)
    assert m, f"no {name} in scontrol show job {job}:\n{res.stdout}{res.stderr}"
    return m.group(1)


def wait_done(env: dict[str, str], job: str, timeout: float) -> str:
    """The job's final state(s), polling until none of its tasks is pending or running."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(env, job)
        if not set(state.split(",")) & ACTIVE:
            return state
        if time.monotonic() > deadline:
            return f"timed out in {state}"
        time.sleep(1)


def queue(env: dict[str, str]) -> str:
    """``squeue`` with the reasons, for failure messages."""
    return subprocess.run([exe("squeue"), "-o", "%i %j %T %r"], env=env, capture_output=True, text=True).stdout
