"""Two trainers on one run_dir: the second fresh start is refused naming the holder (before
the "already holds checkpoints" check, so the message says who is using it); a kill -9 of the
holder frees the lock (the kernel releases it), and ``--resume auto`` continues."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from selectivemae_ds import checkpoint
from tests.launch import BIN, DEMO, REPO
from tests.reliability.faults import records, train_one_rank


@pytest.mark.slow
def test_second_trainer_is_refused_and_kill_9_still_resumes(tmp_path: Path, launch_dataset: Path) -> None:
    run = tmp_path / "run"
    cmd = [str(BIN / "smae-pretrain"), "--config", str(DEMO), "--deepspeed_config",
           str(REPO / "ds_configs" / "cpu_smoke.json"), "--set", f"data.path={launch_dataset}", "--set",
           f"run_dir={run}", "--set", "optim.lr=1e-3", "--set", "train.picture_every=0", "--set", "train.steps=1000",
           "--set", "checkpoint.every_steps=1"]
    first = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while checkpoint.newest_complete(run / "checkpoints") is None:
            assert first.poll() is None and time.monotonic() < deadline, "the first trainer never wrote a checkpoint"
            time.sleep(0.2)
        second = train_one_rank(run, launch_dataset, "train.steps=1000")
        assert second.returncode == 5, second.stderr[-3000:]
        assert f"run error: {run} is in use by another training run (pid {first.pid} on " in second.stderr
        assert "smae-pretrain" in second.stderr and "already holds checkpoints" not in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    newest = checkpoint.newest_complete(run / "checkpoints")
    assert newest is not None
    step = int(checkpoint.read_client_state(newest)["step"])
    resumed = train_one_rank(run, launch_dataset, f"train.steps={step + 1}", "checkpoint.every_steps=1",
                             "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumes = [e for e in records(run) if e.get("event") == "resume"]
    assert [(e["step"], Path(e["from"]).name) for e in resumes] == [(step, newest.name)]
    assert checkpoint.is_complete(run / "checkpoints" / checkpoint.tag_for(step + 1))
