"""Numerics: inf/NaN injected into the loss and into one gradient at chosen steps.

``tests/test_checkpoint.py::test_nonfinite_steps_are_skipped_then_rollback_then_stop``
drills NaN losses; here the loss is inf at one step and one parameter's gradient is inf
(loss finite) at others (``debug.nonfinite_grad_at``): each such step is skipped by
DeepSpeed, counted, leaves the weights untouched, and K in a row roll back once, then stop.
"""
from __future__ import annotations

from pathlib import Path

import torch

from selectivemae_ds import checkpoint
from tests.launch import assert_same_weights, fp32_weights
from tests.reliability.faults import records, train_one_rank


def test_inf_loss_and_inf_gradients_skip_count_rollback_stop(tmp_path: Path, launch_dataset: Path) -> None:
    """Steps (0-based): 0 inf loss, then 2, 3, 4 inf gradients with K = 2: 2+3 roll back to
    the step-3 checkpoint, 3+4 again stop the run."""
    run = tmp_path / "inf"
    r = train_one_rank(run, launch_dataset, "train.steps=5", "checkpoint.every_steps=1", "checkpoint.keep=20",
                       "debug.nonfinite_value=inf", "debug.nonfinite_at=[0]", "debug.nonfinite_grad_at=[2,3,4]",
                       "train.max_nonfinite=2")
    assert r.returncode == 5, r.stdout[-2000:] + r.stderr[-2000:]
    assert ("run error: 2 consecutive non-finite steps (train.max_nonfinite = 2) at step 5 after a rollback; "
            "lower optim.blr, check the data, or raise optim.grad_clip") in r.stderr
    recs = records(run)
    logs = [e for e in recs if "event" not in e]
    # Logged steps 1, 2, 3, then 4 after the rollback: the skipped steps before it still count.
    assert [e["nonfinite_steps"] for e in logs[:4]] == [1, 1, 2, 4]
    rollbacks = [e for e in recs if e.get("event") == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 3 and rollbacks[0]["from_step"] == 4
    # The good step 1 moved the weights; the inf-gradient step 2 (finite loss) applied nothing.
    ck = run / "checkpoints"
    w1, w2, w3 = (fp32_weights(ck / checkpoint.tag_for(s)) for s in (1, 2, 3))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert_same_weights(w2, w3)
    assert all(torch.isfinite(v).all() for v in w3.values())


def test_rollback_passes_over_a_damaged_newest_checkpoint(tmp_path: Path, launch_dataset: Path) -> None:
    """The rollback chooses its checkpoint as ``--resume auto`` does: a newer complete tag whose
    model states are truncated is passed over with a warning, not loaded (which stopped the run)."""
    run = tmp_path / "run"
    r = train_one_rank(run, launch_dataset, "train.steps=4", "checkpoint.every_steps=1", "checkpoint.keep=20")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = run / "checkpoints"
    damaged = ck / checkpoint.tag_for(4)
    model = damaged / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-40])
    # Continue from step 2; 0-based steps 2 and 3 (steps 3 and 4) are NaN: the rollback comes
    # before step 4 is saved again, while the damaged step-4 tag is the newest by name.
    r = train_one_rank(run, launch_dataset, "train.steps=6", "checkpoint.every_steps=1", "checkpoint.keep=20",
                       f"checkpoint.resume={ck / checkpoint.tag_for(2)}", "debug.nonfinite_at=[2,3]",
                       "train.max_nonfinite=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (f"[resume] warning: passed over a damaged checkpoint: {damaged}/mp_rank_00_model_states.pt: "
            "damaged torch zip checkpoint") in r.stderr
    rollbacks = [e for e in records(run) if e.get("event") == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to"] == str(ck / checkpoint.tag_for(3))
    assert rollbacks[0]["step"] == 3 and rollbacks[0]["from_step"] == 4
    assert checkpoint.validate_tag(ck / checkpoint.tag_for(6))["step"] == 6
