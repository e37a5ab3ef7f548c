"""Resume targets that cannot be used stop the trainer before any work, naming what is wrong.

Both tests launch the 2-rank demo through ``deepspeed`` on a copy of a tag of the shared
``straight_run`` (4 steps, checkpoints at 2 and 4); the session's tags are never changed.
The auto-resume fallback past a damaged newest tag runs in
``tests/test_checkpoint.py::test_resume_equals_straight_run`` (ZeRO-3 case), its unit cases in
``test_auto_passes_over_a_damaged_complete_tag_and_a_named_one_is_refused``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from selectivemae_ds import checkpoint
from tests.launch import pretrain


@pytest.mark.slow
def test_a_named_tag_missing_an_optimizer_shard_stops_naming_the_file(tmp_path: Path, launch_dataset: Path,
                                                                      straight_run) -> None:
    """Before: DeepSpeed's FileNotFoundError/AssertionError traceback from inside load_checkpoint."""
    run = tmp_path / "run"
    tag = Path(shutil.copytree(straight_run("zero2.json") / "checkpoints" / "step_00000004",
                               run / "checkpoints" / "step_00000004"))
    (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    r = pretrain(run, launch_dataset, "zero2.json", "--resume", str(tag), check=False)
    assert r.returncode != 0
    assert (f"{tag}: missing *zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1's optimizer states) "
            "(saved by 2 ranks); the tag cannot be loaded") in r.stderr
    assert "FileNotFoundError" not in r.stderr and "AssertionError" not in r.stderr
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_steps_below_the_checkpoint_are_refused_before_config_toml_is_rewritten(tmp_path: Path, launch_dataset: Path,
                                                                                straight_run) -> None:
    """Before: exit 0 with nothing trained, and config.toml rewritten with train.steps = 3."""
    straight = straight_run("zero2.json")
    run = tmp_path / "run"
    shutil.copytree(straight / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000004")
    shutil.copy(straight / "config.toml", run / "config.toml")
    before = (run / "config.toml").read_bytes()
    r = pretrain(run, launch_dataset, "zero2.json", "--resume", "auto", "--set", "train.steps=3", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"config error: train.steps: 3 is below the step of the checkpoint {run / 'checkpoints' / 'step_00000004'} "
            "(4); resume with train.steps >= 4, or start a new run_dir") in r.stderr
    assert (run / "config.toml").read_bytes() == before
    assert checkpoint.list_complete(run / "checkpoints") == [run / "checkpoints" / "step_00000004"]
