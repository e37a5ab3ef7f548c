"""Preemption: SIGTERM/SIGINT end a 2-rank CPU run cleanly, through the ``deepspeed`` launcher.

DeepSpeed 0.19.8's ``deepspeed`` command forwards no signal on a single node (a SIGTERM
kills it alone); its ``launch.py`` child forwards TERM/INT to every rank's process tree.
The trainer handles both: a signal (or the loss of the ``deepspeed`` command) sets a flag
that rides on the step's all_reduce, so all ranks stop after the same step, write a
checkpoint of it (``train.checkpoint_on_preempt``) and exit 128 + the signal number.

- SIGTERM to the ``deepspeed`` command only (a scheduler signalling the job's main
  process): the ranks stop after step s in 1..3 with a complete ``step_s`` (not a cadence
  step: cadence 4 here), no partial tag, and ``--resume auto`` ends with the weights of the
  uninterrupted run (``straight_run``).
- SIGINT to the whole process group (Ctrl-C) with ``train.checkpoint_on_preempt = false``:
  the ranks stop with exit 130 and write nothing beyond the cadence.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from selectivemae_ds import checkpoint
from tests.launch import REPO, assert_same_weights, fp32_weights, pretrain
from tests.reliability.faults import logged_steps, pretrain_cmd, records

DS_JSON = "zero2.json"
TARGET = 4


def _signal_after_step_1(run: Path, data: Path, send: Callable[[subprocess.Popen], None], *extra: str) -> str:
    """Launch 2 ranks (cadence 4), call ``send`` once step 1 is logged, wait for both ranks
    to exit; return the launcher's output."""
    log = run.parent / f"{run.name}.log"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    with open(log, "w") as out:
        proc = subprocess.Popen(pretrain_cmd(run, data, DS_JSON, "--set", "checkpoint.every_steps=4", *extra),
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900  # the start of 2 ranks takes 2 min on 2 idle cores, much more when shared
        while 1 not in logged_steps(run):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        send(proc)
        proc.wait(timeout=60)
        # launch.py outlives the deepspeed command: wait for the whole process group
        # (launch.py, ranks, their input workers) to end on its own.
        while _group_alive(proc.pid):
            assert time.monotonic() < deadline + 120, "the ranks or their launcher did not stop"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies awaiting their reaper do not count)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _stop_event(run: Path) -> dict:
    stops = [e for e in records(run) if e.get("event") == "stop"]
    assert len(stops) == 1, stops
    return stops[0]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # up to three 2-rank launches
def test_sigterm_to_the_launcher_stops_checkpoints_and_resumes_exactly(tmp_path: Path, launch_dataset: Path,
                                                                       straight_run) -> None:
    straight = straight_run(DS_JSON)
    run = tmp_path / "run"
    out = _signal_after_step_1(run, launch_dataset, lambda p: p.send_signal(signal.SIGTERM))
    stop = _stop_event(run)
    step = stop["step"]
    assert 1 <= step < TARGET and stop["reason"] == "the deepspeed launcher is gone (treated as SIGTERM)"
    # Both ranks agreed on the step and exit 143; the launcher reports it.
    for rank in (0, 1):
        assert re.search(rf"\[stop\] rank {rank}: .* stopped after step {step} of {TARGET}, newest complete checkpoint "
                         rf"{checkpoint.tag_for(step)}; exit 143", out), out[-3000:]
    assert "exits with return code = 143" in out
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if checkpoint.TAG_RE.match(p.name))
    assert tags == [checkpoint.tag_for(step)] and checkpoint.is_complete(run / "checkpoints" / tags[0])
    assert stop["checkpoint"] == str(run / "checkpoints" / tags[0])

    pretrain(run, launch_dataset, DS_JSON, "--resume", "auto")
    resumes = [e for e in records(run) if e.get("event") == "resume"]
    assert [e["step"] for e in resumes] == [step]
    final = run / "checkpoints" / checkpoint.tag_for(TARGET)
    assert_same_weights(fp32_weights(straight / "checkpoints" / checkpoint.tag_for(TARGET)), fp32_weights(final))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # one 2-rank launch
def test_ctrl_c_stops_every_rank_without_a_preemption_checkpoint(tmp_path: Path, launch_dataset: Path) -> None:
    run = tmp_path / "run"
    out = _signal_after_step_1(run, launch_dataset, lambda p: os.killpg(p.pid, signal.SIGINT),
                               "--set", "train.checkpoint_on_preempt=false")
    stop = _stop_event(run)
    assert 1 <= stop["step"] < TARGET and stop["reason"] == "SIGINT" and stop["checkpoint"] is None
    for rank in (0, 1):
        assert re.search(rf"\[stop\] rank {rank}: SIGINT; stopped after step {stop['step']} of {TARGET}, newest "
                         r"complete checkpoint None; exit 130", out), out[-3000:]
    assert not (run / "checkpoints").exists() or not any(
        checkpoint.TAG_RE.match(p.name) for p in (run / "checkpoints").iterdir())
