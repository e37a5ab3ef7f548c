"""Training: kill -9 one rank of a 2-rank CPU run, relaunch with ``--resume auto``.

Each trial runs the session's 4-step demo run (checkpoints at steps 2 and 4, ZeRO-2;
``tests/conftest.py::straight_run``) and SIGKILLs rank 1 at a chosen or random moment.
Then it checks that the relaunch

- reaches the target step (a complete ``step_00000004``),
- resumed from a tag that was complete when the rank died (never a partial one),
- lost at most one checkpoint interval (steps logged before the kill minus the resumed step),
- ends with the same fp32 weights as the uninterrupted run (the resume is exact from any
  checkpoint, see tests/test_checkpoint.py, so every restart point allows the comparison).

The CI trial kills during the write of the step-4 checkpoint: the test-only key
``debug.checkpoint_delay_s`` holds every rank between its shard write and the COMPLETE
marker, and the kill fires when the tag's shards and client state exist without the marker.
The heavy trials (``--heavy-trials N``) draw the moment at random.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from selectivemae_ds import checkpoint
from tests.launch import REPO, assert_same_weights, fp32_weights, pretrain
from tests.reliability.faults import logged_steps, pretrain_cmd, rank_pid

DS_JSON = "zero2.json"
EVERY = 2
TARGET = 4


@dataclass
class Trial:
    """What one kill trial observed."""

    moment: str
    killed: bool
    steps_before_kill: int
    complete_at_kill: list[str]
    resumed_from: str | None
    resumed_step: int


def _writing(run: Path, step: int) -> Callable[[], bool]:
    """True while tag ``step`` holds shards and client state but no COMPLETE marker."""
    tag = run / "checkpoints" / checkpoint.tag_for(step)

    def check() -> bool:
        return (tag / checkpoint.CLIENT_STATE).is_file() and any(tag.glob("*optim_states.pt")) and \
            not (tag / checkpoint.COMPLETE).exists()
    return check


def _after(run: Path, step: int, extra_s: float) -> Callable[[], bool]:
    """True ``extra_s`` seconds after step ``step`` was logged."""
    seen: list[float] = []

    def check() -> bool:
        if not seen and step in logged_steps(run):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= extra_s
    return check


def kill_trial(run: Path, data: Path, moment: str, condition: Callable[[], bool], delay_s: float) -> Trial:
    """Launch, SIGKILL rank 1 when ``condition`` holds, relaunch with --resume auto."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    delay = ["--set", f"debug.checkpoint_delay_s={delay_s}"] if delay_s > 0 else []
    proc = subprocess.Popen(pretrain_cmd(run, data, DS_JSON, *delay), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = False
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                pid = rank_pid(run, 1)
                if pid is not None:
                    steps = logged_steps(run)
                    complete = [p.name for p in checkpoint.list_complete(run / "checkpoints")]
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.01)
        # The launcher normally tears the job down at once; a surviving rank blocked in a
        # gloo collective can hold it until the collective times out. A cluster's
        # scheduler would kill such a job; so does the finally clause after 30 s.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not killed:
        steps = logged_steps(run)
        complete = [p.name for p in checkpoint.list_complete(run / "checkpoints")]
    else:
        assert proc.returncode != 0, "the launcher reported success after a rank was killed"
    pretrain(run, data, DS_JSON, "--resume", "auto")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    resumed_from = Path(resumes[-1]["from"]).name if resumes else None
    resumed_step = resumes[-1]["step"] if resumes else 0
    return Trial(moment, killed, max(steps, default=0), complete, resumed_from, resumed_step)


def check_trial(t: Trial, run: Path, straight: Path) -> None:
    final = run / "checkpoints" / checkpoint.tag_for(TARGET)
    assert checkpoint.is_complete(final), f"{t}: the relaunch did not reach step {TARGET}"
    if t.resumed_from is not None:
        assert t.resumed_from in t.complete_at_kill, f"{t}: resumed from a tag that was not complete at the kill"
    else:
        assert not t.complete_at_kill, f"{t}: started fresh although a complete checkpoint existed"
    assert t.steps_before_kill - t.resumed_step <= EVERY, f"{t}: lost more than one checkpoint interval"
    assert_same_weights(fp32_weights(straight / "checkpoints" / checkpoint.tag_for(TARGET)), fp32_weights(final))


@pytest.mark.slow
def test_kill_rank_during_checkpoint_write_then_resume(tmp_path: Path, launch_dataset: Path, straight_run) -> None:
    straight = straight_run(DS_JSON)
    run = tmp_path / "run"
    t = kill_trial(run, launch_dataset, "during the step-4 checkpoint write", _writing(run, TARGET), delay_s=4.0)
    assert t.killed and t.complete_at_kill == [checkpoint.tag_for(2)] and t.steps_before_kill == TARGET
    assert t.resumed_from == checkpoint.tag_for(2) and t.resumed_step == 2
    check_trial(t, run, straight)


@pytest.mark.heavy
def test_kill_rank_at_random_moments(tmp_path: Path, launch_dataset: Path, straight_run, heavy_trials: int,
                                     heavy_seed: int) -> None:
    """``--heavy-trials N`` trials: a third inside a checkpoint write (step 2 or 4), the rest
    a random time after a random step was logged (which may land in a write too)."""
    straight = straight_run(DS_JSON)
    rng = random.Random(heavy_seed)
    trials: list[Trial] = []
    for i in range(heavy_trials):
        run = tmp_path / f"t{i:03d}"
        if i % 3 == 0:
            step = rng.choice([EVERY, TARGET])
            t = kill_trial(run, launch_dataset, f"writing step {step}", _writing(run, step), delay_s=3.0)
        else:
            step, extra = rng.randint(0, TARGET - 1), round(rng.uniform(0.0, 2.0), 2)
            cond = _after(run, step, extra) if step > 0 else (lambda: rank_pid(run, 1) is not None)
            t = kill_trial(run, launch_dataset, f"{extra}s after step {step}", cond, delay_s=0.0)
        check_trial(t, run, straight)
        trials.append(t)
        print(f"[trial {i}] {t}", flush=True)
    killed = sum(t.killed for t in trials)
    print(f"[summary] {len(trials)} trials, {killed} killed mid-run, resumed from "
          f"{sorted({str(t.resumed_from) for t in trials})}, max lost steps "
          f"{max(t.steps_before_kill - t.resumed_step for t in trials)}", flush=True)
    assert killed >= heavy_trials // 2
