"""``launcher/slurm_example.sbatch`` on a real SLURM (the one-node cluster of
``slurm_cluster.py``): one node, 2 CPU ranks under torchrun, the demo model with the
session's ``straight_run`` settings, configured only through the script's environment
variables and sbatch's own options.

The first job is preempted as the script's ``--signal=TERM@300`` would do it
(``scancel --signal=TERM``, which signals every process of the job step): the ranks stop
after the same step S, write its checkpoint and exit 143. Resubmitting the same script
(``checkpoint.resume = "auto"``) continues from step S and ends with the weights of the
uninterrupted 2-rank run; a third submission with more steps continues from the last one.

The end-to-end test is skipped, with the reason, where SLURM is not installed or the test
does not run as root. A fast test runs the script with stand-ins for ``srun``, ``scontrol``
and ``torchrun`` and checks the command line it builds, by default and from the variables.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from selectivemae_ds import checkpoint
from tests.launch import BIN, DEMO, DEMO_SETS, REPO, assert_same_weights, fp32_weights, free_port, logged
from tests.reliability.faults import logged_steps, records
from tests.reliability.slurm_cluster import SKIP_UNLESS_SLURM, exe, job_field, queue, wait_done

DS_JSON = "zero2.json"
TARGET = 4
RANKS = 2
# Every job starts two ranks (imports, DeepSpeed and DALI set-up): 44-51 s of SLURM run
# time measured on 2 cores at load average 8-10; longer when more tests share them.
JOB_TIMEOUT_S = 600


def _submit(slurm: dict[str, str], run: Path, data: Path, log: Path, *sets: str) -> tuple[str, int]:
    """sbatch the example for one node and 2 CPU ranks; return the job id and its torchrun port."""
    port = free_port()
    # torchrun gives its ranks OMP_NUM_THREADS=1 when it is unset, the deepspeed launcher of
    # the straight run leaves torch's default: the same thread count gives the same sums.
    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    env = dict(slurm, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=threads, GPUS_PER_NODE=str(RANKS), SMAE_VENV=str(BIN.parent),
               SMAE_CONFIG=str(DEMO), SMAE_DS_CONFIG=str(REPO / "ds_configs" / DS_JSON), SMAE_DATA=str(data),
               SMAE_RUN_DIR=str(run), SMAE_SET=" ".join([*DEMO_SETS, "checkpoint.resume=auto", *sets]),
               MASTER_PORT=str(port),
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run([exe("sbatch"), "--parsable", "--nodes", "1", "--gpus-per-node=0",
                          f"--cpus-per-task={RANKS}", f"--output={log}", "launcher/slurm_example.sbatch"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0], port


def _finish(slurm: dict[str, str], job: str, log: Path, port: int) -> str:
    """Wait for the job; return its final state. The ranks unlinked DeepSpeed's shared-memory
    all-reduce buffers (69 MB each, named after the port) once mapped: none is left."""
    state = wait_done(slurm, job, timeout=JOB_TIMEOUT_S)
    assert not state.startswith("timed out"), f"{state}\n{queue(slurm)}\n{log.read_text()[-3000:]}"
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not left, f"shared-memory buffers left behind: {left}"
    return state


@pytest.mark.slow
@SKIP_UNLESS_SLURM
@pytest.mark.timeout(2400)  # three 2-rank jobs and the straight run, on shared cores
def test_sbatch_example_preempted_resubmitted_equals_straight_run_and_extends(
        slurm: dict[str, str], tmp_path: Path, launch_dataset: Path, straight_run) -> None:
    straight = straight_run(DS_JSON)
    run = tmp_path / "run"
    began = time.monotonic()

    # 1. Preempted: TERM to the job step once step 1 is logged (a cadence of 4, so the only
    # tag before step 4 is the one the stop writes).
    log1 = tmp_path / "job1.out"
    job1, port = _submit(slurm, run, launch_dataset, log1, "checkpoint.every_steps=4")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while 1 not in logged_steps(run):
        state = job_field(slurm, job1, "JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING") and time.monotonic() < deadline, (
            f"{state}\n{queue(slurm)}\n{log1.read_text()[-3000:] if log1.exists() else ''}")
        time.sleep(0.2)
    subprocess.run([exe("scancel"), "--signal=TERM", job1], env=slurm, check=True, timeout=30)
    state = _finish(slurm, job1, log1, port)
    out1 = log1.read_text()
    stops = [e for e in records(run) if e.get("event") == "stop"]
    assert len(stops) == 1, out1[-3000:]
    step = stops[0]["step"]
    assert 1 <= step < TARGET and stops[0]["reason"] == "SIGTERM", stops
    for rank in range(RANKS):
        assert re.search(rf"\[stop\] rank {rank}: SIGTERM; stopped after step {step} of {TARGET}, newest complete "
                         rf"checkpoint {checkpoint.tag_for(step)}; exit 143", out1), out1[-3000:]
    # torchrun passes the TERM on, waits for its ranks, then exits 1 itself: the job fails.
    assert (state, job_field(slurm, job1, "ExitCode")) == ("FAILED", "1:0"), out1[-3000:]
    tag = run / "checkpoints" / checkpoint.tag_for(step)
    assert checkpoint.list_complete(run / "checkpoints") == [tag]
    assert stops[0]["checkpoint"] == str(tag)
    assert sorted(logged(run)) == list(range(1, step + 1))

    # 2. The same script resubmitted continues from the stop checkpoint to the target.
    log2 = tmp_path / "job2.out"
    job2, port = _submit(slurm, run, launch_dataset, log2, "checkpoint.every_steps=4")
    state = _finish(slurm, job2, log2, port)
    out2 = log2.read_text()
    assert (state, job_field(slurm, job2, "ExitCode")) == ("COMPLETED", "0:0"), out2[-3000:]
    assert f"[resume] step={step}" in out2, out2[-3000:]
    assert [e["step"] for e in records(run) if e.get("event") == "resume"] == [step]
    steps = [r["step"] for r in records(run) if "event" not in r]
    assert steps == list(range(1, TARGET + 1)), steps
    final = run / "checkpoints" / checkpoint.tag_for(TARGET)
    assert_same_weights(fp32_weights(straight / "checkpoints" / checkpoint.tag_for(TARGET)), fp32_weights(final))
    for s in range(step + 1, TARGET + 1):
        assert logged(run)[s]["loss"] == pytest.approx(logged(straight)[s]["loss"], rel=1e-6, abs=1e-7)

    # 3. Resubmitted with more steps: it continues from the last checkpoint.
    log3 = tmp_path / "job3.out"
    job3, port = _submit(slurm, run, launch_dataset, log3, f"train.steps={TARGET + 2}")
    state = _finish(slurm, job3, log3, port)
    out3 = log3.read_text()
    assert (state, job_field(slurm, job3, "ExitCode")) == ("COMPLETED", "0:0"), out3[-3000:]
    assert f"[resume] step={TARGET}" in out3, out3[-3000:]
    assert [r["step"] for r in records(run) if "event" not in r][-2:] == [TARGET + 1, TARGET + 2]
    assert checkpoint.is_complete(run / "checkpoints" / checkpoint.tag_for(TARGET + 2))
    runtimes = ", ".join(job_field(slurm, j, "RunTime") for j in (job1, job2, job3))
    print(f"[slurm-train] three jobs in {time.monotonic() - began:.0f} s (run times {runtimes})")


def _command_line(tmp_path: Path, **variables: str) -> tuple[list[str], list[str]]:
    """Run the script as SLURM's second node would (node rank 1 of 2), with ``srun``,
    ``scontrol`` and ``.venv/bin/torchrun`` replaced by scripts that record their
    arguments; return (srun's options, [torchrun's path, *its arguments])."""
    bin_dir, venv = tmp_path / "bin", tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    venv.mkdir(parents=True)
    stand_ins = {
        bin_dir / "scontrol": 'printf "node-a\\nnode-b\\n"',
        bin_dir / "srun": 'while [[ $1 == --* ]]; do echo "$1" >> "$SUBMIT/srun.args"; shift; done; exec "$@"',
        venv / "torchrun": 'printf "%s\\n" "$0" "$@" > "$SUBMIT/torchrun.args"',
    }
    for path, body in stand_ins.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SUBMIT": str(tmp_path),
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
           "SLURM_NODEID": "1", **variables}
    res = subprocess.run(["bash", str(REPO / "launcher" / "slurm_example.sbatch")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return ((tmp_path / "srun.args").read_text().splitlines(), (tmp_path / "torchrun.args").read_text().splitlines())


def test_example_defaults_are_the_vitb_8_gpu_run_and_variables_change_it(tmp_path: Path) -> None:
    directives = [line for line in (REPO / "launcher" / "slurm_example.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=selectivemae", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                          "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --time=48:00:00",
                          "#SBATCH --output=slurm-%j.out", "#SBATCH --signal=TERM@300"]
    srun, torchrun = _command_line(tmp_path / "defaults")
    assert srun == ["--kill-on-bad-exit=1"]
    assert torchrun == [  # the submit directory's .venv
        f"{tmp_path}/defaults/.venv/bin/torchrun", "--node_rank", "1", "--nnodes", "2", "--nproc_per_node", "8", "--master_addr", "node-a",
        "--master_port", "29500", "--shutdown-timeout", "240", "launcher/pretrain.py",
        "--config", "configs/selectivemae_vitb_800ep.toml", "--deepspeed_config", "ds_configs/zero1.json",
        "--set", "data.path=/shared/opticalrs13m", "--set", "run_dir=/shared/runs/selectivemae_vitb_800ep"]

    venv = tmp_path / "defaults" / ".venv"
    _, torchrun = _command_line(
        tmp_path / "set", SMAE_CONFIG="configs/demo.toml", SMAE_DS_CONFIG="ds_configs/zero2.json",
        SMAE_DATA="/data/d 1", SMAE_RUN_DIR="/runs/r", GPUS_PER_NODE="2", SMAE_VENV=str(venv),
        SMAE_SET="train.steps=4  checkpoint.resume=auto", MASTER_PORT="4242", SMAE_STOP_GRACE_S="60")
    assert torchrun == [
        f"{venv}/bin/torchrun", "--node_rank", "1", "--nnodes", "2", "--nproc_per_node", "2", "--master_addr", "node-a",
        "--master_port", "4242", "--shutdown-timeout", "60", "launcher/pretrain.py",
        "--config", "configs/demo.toml", "--deepspeed_config", "ds_configs/zero2.json",
        "--set", "data.path=/data/d 1", "--set", "run_dir=/runs/r",
        "--set", "train.steps=4", "--set", "checkpoint.resume=auto"]
