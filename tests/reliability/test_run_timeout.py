"""A hung rank: SIGSTOP rank 1 of a 2-rank CPU run; rank 0 must give up within
``train.collective_timeout_s`` (not the backend's 30-minute default) with a run error
(exit 5) that names itself, the collective it waited in and the step."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import REPO
from tests.reliability.faults import logged_steps, pretrain_cmd, rank_pid

TIMEOUT_S = 30  # long enough for two ranks on two shared cores to start in step


def _wait_gone(pid: int, limit_s: float) -> float | None:
    """Seconds until ``pid`` no longer exists, or None after ``limit_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


@pytest.mark.slow
def test_stopped_rank_makes_the_other_fail_within_the_timeout(tmp_path: Path, launch_dataset: Path) -> None:
    run = tmp_path / "run"
    log = tmp_path / "launcher.log"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = pretrain_cmd(run, launch_dataset, "zero2.json", "--set", "train.steps=50",
                       "--set", f"train.collective_timeout_s={TIMEOUT_S}")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline and 1 not in logged_steps(run):
            time.sleep(0.2)
        rank0, stopped = rank_pid(run, 0), rank_pid(run, 1)
        assert rank0 and stopped, log.read_text()[-3000:]
        os.kill(stopped, signal.SIGSTOP)
        took = _wait_gone(rank0, TIMEOUT_S + 60)
        assert took is not None, f"rank 0 still waits {TIMEOUT_S + 60} s after its peer stopped"
        assert took < TIMEOUT_S + 45  # the timeout, then the exit (teardown on 2 shared cores)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    # Rank 1 may stop inside a step or just before the checkpoint at step 2: either collective
    # must be named, with its step.
    assert re.search(rf"run error: rank 0: the (step's [^\n]*|checkpoint write's barriers) at step \d+ timed out after "
                     rf"train.collective_timeout_s = {TIMEOUT_S} s waiting for the other ranks", text), text[-3000:]
    assert "exits with return code = 5" in text


def test_only_a_backend_timeout_becomes_a_run_error() -> None:
    from selectivemae_ds.errors import RunError
    from selectivemae_ds.trainer import collective

    gloo = "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"
    with pytest.raises(RunError) as e:
        with collective("the step's all_reduce", 1, 7, 5.0):
            raise RuntimeError(gloo)
    assert str(e.value).startswith("rank 1: the step's all_reduce at step 7 timed out after "
                                   "train.collective_timeout_s = 5 s waiting for the other ranks")
    with pytest.raises(RuntimeError, match="^DALI timed out$"):  # not a collective: unchanged
        with collective("the step's all_reduce", 1, 7, 5.0):
            raise RuntimeError("DALI timed out")


def test_a_signal_becomes_a_stop_request_and_handlers_are_restored() -> None:
    from selectivemae_ds.trainer import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    assert stop.poll() == 0
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # a second request does not change the first
    assert stop.poll() == signal.SIGTERM and stop.reason == "SIGTERM"
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
