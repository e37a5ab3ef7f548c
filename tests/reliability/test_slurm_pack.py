"""Multi-node packing on a real SLURM: a one-node cluster (munged, slurmctld, slurmd from the
Debian packages, with three CPU slots) started inside the test from a temporary config and
state directory, ``launcher/pack_slurm.sh`` submitting the part array and the dependent
merge with ``sbatch``, and the merged dataset checked against the single-node pack.

Skipped, with the reason, where the packages are not installed (``.ci/run`` installs them)
or the test does not run as root (slurmd starts jobs as their owner).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from data_prep.pack import PackConfig, pack
from tests.launch import REPO, free_port
from tests.test_pack_parts import _assert_adds_up, _records

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")
SLOTS = 3
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def _missing() -> str | None:
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return (f"SLURM/munge not installed ({', '.join(absent)} missing): "
                "apt-get install -y slurmctld slurmd munge slurm-client (.ci/run does)")
    if os.geteuid() != 0:
        return "needs root: slurmd runs the jobs as their owner"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _conf(root: Path, host: str) -> str:
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
NodeName=smae-node0 NodeAddr=127.0.0.1 NodeHostname={host} CPUs={SLOTS} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A running one-node cluster; yields the environment its clients need."""
    root = Path(tempfile.mkdtemp(prefix="smae-slurm-"))  # short: the munge socket path has a length limit
    procs: list[subprocess.Popen] = []
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
        conf.write_text(_conf(root, host))
        env = dict(os.environ, SLURM_CONF=str(conf))
        logs = open(root / "log" / "daemons.out", "wb")
        procs.append(subprocess.Popen(
            [_exe("munged"), "-F", "-f", f"--key-file={key}", f"--socket={root}/munge/munge.sock",
             f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
             f"--seed-file={root}/munge/seed"], stdout=logs, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 20
        while not (root / "munge" / "munge.sock").exists():
            assert time.monotonic() < deadline, (root / "log" / "daemons.out").read_text()
            time.sleep(0.1)
        procs.append(subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", str(conf)], env=env, stdout=logs,
                                      stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([_exe("slurmd"), "-D", "-N", "smae-node0", "-f", str(conf)], env=env,
                                      stdout=logs, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        state = ""
        while state != "idle":
            assert all(p.poll() is None for p in procs), (root / "log" / "daemons.out").read_text()
            assert time.monotonic() < deadline, f"node state {state!r}\n" + (root / "log" / "daemons.out").read_text()
            time.sleep(0.5)
            res = subprocess.run([_exe("sinfo"), "-h", "-o", "%t"], env=env, capture_output=True, text=True)
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


def _job_state(env: dict[str, str], job: str) -> str:
    res = subprocess.run([_exe("scontrol"), "show", "job", job], env=env, capture_output=True, text=True)
    states = re.findall(r"JobState=(\S+)", res.stdout)
    return ",".join(sorted(set(states))) or f"unknown ({res.stderr.strip()})"


def _wait_done(env: dict[str, str], job: str, timeout: float) -> str:
    """The job's final state(s), polling until none of its tasks is pending or running."""
    deadline = time.monotonic() + timeout
    while True:
        state = _job_state(env, job)
        if not set(state.split(",")) & ACTIVE:
            return state
        if time.monotonic() > deadline:
            return f"timed out in {state}"
        time.sleep(1)


def test_slurm_array_parts_and_dependent_merge_equal_single_node(slurm: dict[str, str], tmp_path: Path,
                                                                  assets_dir: Path) -> None:
    single = tmp_path / "single"
    pack(PackConfig(sources=[str(assets_dir)], out=single, workers=1, images_per_shard=4, progress=False))
    out, logs = tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    env = dict(slurm, LOG_DIR=str(logs), CPUS_PER_PART="1", SMAE_PACK=f"{sys.executable} -m data_prep.cli",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run(["bash", "launcher/pack_slurm.sh", str(SLOTS), str(out), str(assets_dir),
                          "--images-per-shard", "4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    m = re.fullmatch(r"parts: job (\d+) \(array 0-2\); merge: job (\d+) \(runs after every part succeeds\)\n",
                     res.stdout)
    assert m, res.stdout
    parts_job, merge_job = m.groups()
    state = _wait_done(env, merge_job, timeout=300)
    queue = subprocess.run([_exe("squeue"), "-o", "%i %j %T %r"], env=env, capture_output=True, text=True).stdout
    assert state == "COMPLETED", queue + "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(logs.iterdir()))
    assert _job_state(env, parts_job) == "COMPLETED"

    assert sorted(p.name for p in logs.glob("*.json")) == [
        "smae-pack-merge.json"] + [f"smae-pack-part-{i}-of-3.json" for i in range(3)]
    part_reports = [json.loads((logs / f"smae-pack-part-{i}-of-3.json").read_text()) for i in range(3)]
    merged = json.loads((logs / "smae-pack-merge.json").read_text())
    assert [r["part"] for r in part_reports] == ["0/3", "1/3", "2/3"]
    assert [p["packed"] for p in merged["parts"]] == [r["packed"] for r in part_reports]
    _assert_adds_up(merged, single)
    assert _records(out) == _records(single)
    merge_log = next(logs.glob("smae-pack-merge-*.out")).read_text()
    assert "verify " in merge_log and "OK, 13 records" in merge_log, merge_log
