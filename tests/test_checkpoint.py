"""Checkpoints: completeness marker, keep-last-k, compatibility, and exact resume through the launcher.

The multi-rank tests run ``deepspeed --num_gpus 2 launcher/pretrain.py`` with the CPU
accelerator (gloo) on a tiny packed dataset: ViT-tiny, 64 px, 4 steps of 8 images.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selectivemae_ds import checkpoint
from selectivemae_ds.errors import EXIT_CHECKPOINT, EXIT_CONFIG, CheckpointError, ConfigError, run_cli
from selectivemae_ds.models import get_spec
from tests.launch import (BIN, DEMO, DEMO_METHOD, REPO, assert_same_weights, fp32_weights, logged, method_args,
                          pretrain)


# ---------------------------------------------------------------- unit tests (no engine)

def make_tag(root: Path, step: int, *, complete: bool, world_size: int = 2, config: dict | None = None) -> Path:
    """A tag with the files a ZeRO-1/2 save of ``world_size`` ranks writes (tiny real torch files)."""
    tag = root / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, tag / "mp_rank_00_model_states.pt")
    for r in range(world_size):
        torch.save({"optimizer_state_dict": {"step": step}}, tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    state = {"step": step, "world_size": world_size, "config": config or {"model": {"size": "tiny"}}}
    (tag / checkpoint.CLIENT_STATE).write_text(json.dumps(state))
    if complete:
        (tag / checkpoint.COMPLETE).write_text(f"{step}\n")
    return tag


def test_interrupted_write_is_never_picked(tmp_path: Path) -> None:
    make_tag(tmp_path, 2, complete=True)
    make_tag(tmp_path, 4, complete=False)  # the write of step 4 was interrupted
    (tmp_path / "latest").write_text("step_00000004")  # DeepSpeed's pointer is not trusted
    assert checkpoint.newest_complete(tmp_path) == tmp_path / "step_00000002"
    target = checkpoint.resolve_resume("auto", tmp_path, {"model": {"size": "tiny"}}, world_size=2)
    assert target is not None and target.tag_dir.name == "step_00000002"
    with pytest.raises(checkpoint.DamagedCheckpointError, match="step_00000004 is incomplete"):
        checkpoint.resolve_resume(str(tmp_path / "step_00000004"), tmp_path, {"model": {"size": "tiny"}}, 2)
    assert checkpoint.resolve_resume("auto", tmp_path / "none", {}, 2) is None


def test_fresh_start_over_existing_checkpoints_is_refused(tmp_path: Path) -> None:
    make_tag(tmp_path, 2, complete=True)
    with pytest.raises(ConfigError, match="checkpoint.resume: .* already holds checkpoints \\(newest step_00000002\\); "
                                         "continue them with --resume auto"):
        checkpoint.resolve_resume("", tmp_path, {}, world_size=2)


def test_keep_last_k(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4):
        make_tag(tmp_path, s, complete=True)
    make_tag(tmp_path, 0, complete=False)
    make_tag(tmp_path, 5, complete=False)  # may still be being written: newer than the newest complete
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]


def _damage(tag: Path, how: str) -> str:
    """Damage a complete tag one way; return the text the refusal must contain."""
    optim = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    model = tag / "mp_rank_00_model_states.pt"
    if how == "missing optimizer shard":
        optim.unlink()
        return "missing *zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1's optimizer states) (saved by 2 ranks)"
    if how == "missing model states":
        model.unlink()
        return "missing mp_rank_00_model_states.pt"
    if how == "truncated model states":
        model.write_bytes(model.read_bytes()[:-40])
        return "mp_rank_00_model_states.pt: damaged torch zip checkpoint (PytorchStreamReader failed"
    if how == "empty optimizer shard":
        optim.write_bytes(b"")
        return "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: empty file"
    if how == "unreadable client state":
        (tag / checkpoint.CLIENT_STATE).write_text('{"step": 4, "world_si')
        return "client_state.json: unreadable client state (Unterminated string"
    if how == "missing client state":
        (tag / checkpoint.CLIENT_STATE).unlink()
        return "client_state.json: missing (the tag has COMPLETE but no client state)"
    raise AssertionError(how)


DAMAGES = ["missing optimizer shard", "missing model states", "truncated model states", "empty optimizer shard",
           "unreadable client state", "missing client state"]


@pytest.mark.parametrize("how", DAMAGES)
def test_auto_passes_over_a_damaged_complete_tag_and_a_named_one_is_refused(tmp_path: Path, how: str) -> None:
    """The newest tag has COMPLETE but cannot be loaded: --resume auto takes the one before and
    says why; --resume naming the damaged tag stops with a CheckpointError naming the file."""
    make_tag(tmp_path, 2, complete=True)
    newest = make_tag(tmp_path, 4, complete=True)
    why = _damage(newest, how)
    target = checkpoint.resolve_resume("auto", tmp_path, {"model": {"size": "tiny"}}, world_size=2)
    assert target is not None and target.tag_dir.name == "step_00000002"
    assert len(target.skipped) == 1 and why in target.skipped[0] and str(newest) in target.skipped[0]
    with pytest.raises(CheckpointError) as info:
        checkpoint.resolve_resume(str(newest), tmp_path, {"model": {"size": "tiny"}}, world_size=2)
    assert why in str(info.value)


def test_auto_with_every_complete_tag_damaged_is_refused_not_a_fresh_start(tmp_path: Path) -> None:
    for step in (2, 4):
        (make_tag(tmp_path, step, complete=True) / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(checkpoint.DamagedCheckpointError,
                       match=r"checkpoint.resume auto: none of the 2 complete checkpoints under .* can be loaded: "
                             r".*step_00000004: missing mp_rank_00_model_states.pt.*; .*step_00000002: missing"):
        checkpoint.resolve_resume("auto", tmp_path, {"model": {"size": "tiny"}}, world_size=2)


def test_zero3_tags_need_every_ranks_model_states(tmp_path: Path) -> None:
    tag = make_tag(tmp_path, 2, complete=True)
    (tag / "mp_rank_00_model_states.pt").rename(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"missing zero_pp_rank_1_mp_rank_00_model_states.pt"):
        checkpoint.validate_tag(tag)
    torch.save({"module": {}}, tag / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    assert checkpoint.validate_tag(tag)["step"] == 2


def test_steps_below_the_checkpoint_are_refused(tmp_path: Path) -> None:
    target = checkpoint.resolve_resume("auto", make_tag(tmp_path, 4, complete=True).parent, {"model": {"size": "tiny"}},
                                       world_size=2)
    assert target is not None
    checkpoint.check_steps(target, 4)  # nothing left to train is not an error
    with pytest.raises(ConfigError, match=r"train.steps: 3 is below the step of the checkpoint .*step_00000004 \(4\); "
                                          r"resume with train.steps >= 4"):
        checkpoint.check_steps(target, 3)


def test_prune_leaves_tags_newer_than_the_save_alone(tmp_path: Path) -> None:
    """After --resume auto passed over a damaged step-4 tag, saving step 3 with keep=1 must delete
    step 2, not the step 3 it just wrote (the damaged tag sorts newest)."""
    for step in (2, 3, 4):
        make_tag(tmp_path, step, complete=True)
    removed = checkpoint.prune(tmp_path, keep=1, upto=checkpoint.tag_for(3))
    assert [p.name for p in removed] == ["step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_to_universal_cli_refuses_before_converting(tmp_path: Path, capsys) -> None:
    """``python -m selectivemae_ds.checkpoint`` goes through errors.run_cli: typed errors, exit codes, help."""
    main = checkpoint.main
    assert run_cli(main, ["to-universal", str(tmp_path / "nope")]) == EXIT_CHECKPOINT
    assert f"checkpoint error: {tmp_path / 'nope'}: no such checkpoint directory" in capsys.readouterr().err
    interrupted = make_tag(tmp_path / "a", 2, complete=False)
    assert run_cli(main, ["to-universal", str(interrupted)]) == EXIT_CHECKPOINT
    assert "is incomplete (no COMPLETE marker)" in capsys.readouterr().err
    tag = make_tag(tmp_path / "b", 2, complete=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    assert run_cli(main, ["to-universal", str(tag), "--out", str(taken)]) == EXIT_CONFIG
    assert f"config error: --out: {taken} exists and is not an earlier universal conversion" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "keep me"
    (tag / "zero").mkdir()
    assert run_cli(main, ["to-universal", str(tag)]) == EXIT_CONFIG
    assert "is already a universal checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["to-universal", str(tag), "--workers", "0"])
    assert info.value.code == 2 and "--workers: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["to-universal", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for text in ("a complete sharded tag, e.g.", "output directory (default: TAG_DIR_universal",
                 "processes ds_to_universal uses", "show this help message"):
        assert text in help_text


def test_incompatible_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    saved = {"model": {"method": "selectivemae", "size": "tiny", "img_size": 64}, "train": {"global_batch": 8}}
    make_tag(tmp_path, 2, complete=True, config=saved)
    current = json.loads(json.dumps(saved))
    current["model"]["size"] = "small"
    with pytest.raises(ValueError, match="model.size: the checkpoint .*step_00000002 was trained with 'tiny', "
                                         "this config has 'small'"):
        checkpoint.resolve_resume("auto", tmp_path, current, world_size=2)
    current = json.loads(json.dumps(saved))
    current["train"]["global_batch"] = 16
    with pytest.raises(ValueError, match="train.global_batch: .* with 8, this config has 16"):
        checkpoint.resolve_resume("auto", tmp_path, current, world_size=2)


def test_other_world_size_needs_universal_conversion(tmp_path: Path) -> None:
    make_tag(tmp_path, 2, complete=True, world_size=2)
    with pytest.raises(CheckpointError, match="saved by 2 ranks and this run has 1; convert it first: "
                                         "python -m selectivemae_ds.checkpoint to-universal"):
        checkpoint.resolve_resume("auto", tmp_path, {"model": {"size": "tiny"}}, world_size=1)


# ---------------------------------------------------------------- through the launcher

@pytest.mark.parametrize("ds_json, resume", [("zero2.json", "path"), ("zero3.json", "auto")])
def test_resume_equals_straight_run(tmp_path: Path, launch_dataset: Path, straight_run, ds_json: str, resume: str) -> None:
    """ZeRO-2 resumes from a named tag; ZeRO-3 with --resume auto from a run_dir whose
    newest tag is complete but lost rank 1's optimizer shard (passed over with a warning) and
    whose next one is an interrupted write (its shards are there, COMPLETE is not)."""
    straight, resumed = straight_run(ds_json), tmp_path / "resumed"
    mid = straight / "checkpoints" / "step_00000002"
    assert checkpoint.is_complete(mid)
    if resume == "auto":
        ckpts = resumed / "checkpoints"
        ckpts.mkdir(parents=True)
        shutil.copytree(mid, ckpts / mid.name)
        interrupted = shutil.copytree(straight / "checkpoints" / "step_00000004", ckpts / "step_00000003")
        (interrupted / checkpoint.COMPLETE).unlink()
        damaged = Path(shutil.copytree(straight / "checkpoints" / "step_00000004", ckpts / "step_00000004"))
        next(damaged.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
        r = pretrain(resumed, launch_dataset, ds_json, "--resume", "auto")
        assert f"from={ckpts / mid.name}" in r.stdout
        assert (f"[resume] warning: passed over a damaged checkpoint: {damaged}: missing "
                "*zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1's optimizer states)") in r.stderr
    else:
        r = pretrain(resumed, launch_dataset, ds_json, "--resume", str(mid))
    assert "[resume] step=2" in r.stdout
    a, b = logged(straight), logged(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step]["samples_seen"] == a[step]["samples_seen"] == 8 * step
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7)
    assert a[1]["loss"] != a[4]["loss"]
    wa = fp32_weights(straight / "checkpoints" / "step_00000004")
    wb = fp32_weights(resumed / "checkpoints" / "step_00000004")
    assert_same_weights(wa, wb)
    # The steps really moved the weights (else equality would prove nothing).
    w_mid = fp32_weights(mid)
    assert any(not torch.equal(w_mid[k], wa[k]) for k in wa)
    assert list((straight / "tensorboard").iterdir())


# The demo's method (fast tier) and the methods with a `run` of their own (slow; their 2-rank
# runs are shared with tests/test_ctxmim.py). mae and crossmae take the demo method's path
# (`MethodSpec.run`, random masking seeded like simmim's blocks); with them the five passed
# (update differences 0.15% and 0.26%), at 100-130 s more each on the shared 2-core machine.
UNIVERSAL_METHODS = (DEMO_METHOD, "simmim", "ctxmim")


@pytest.mark.parametrize("method", [m if m == DEMO_METHOD else pytest.param(m, marks=pytest.mark.slow)
                                    for m in UNIVERSAL_METHODS])
def test_two_ranks_to_one_through_universal_checkpoint(tmp_path: Path, launch_dataset: Path, straight_run,
                                                       method: str) -> None:
    """The 2-rank run's step-2 tag, converted, resumed on 1 rank, gives the 2-rank run's
    steps 3 and 4 (losses and loss terms, weights).

    A micro-batch's masks and drop paths are seeded from its place in the global batch
    (`trainer.micro_seed`), so the 1-rank run draws the same ones for the same images (before:
    seeded per rank, simmim's step-3 loss was 0.8542 on 1 rank against 0.8526 on 2). Step 3
    runs the loaded weights: equal up to the order of the loss sums. From step 4 on, the
    step-3 update differs by the order of the bf16 gradient sums (2 micro-batches per rank
    then across ranks, or 4 on one rank), which Adam enlarges where gradients are tiny."""
    two = straight_run("zero2.json", method)
    mid = two / "checkpoints" / "step_00000002"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-m", "selectivemae_ds.checkpoint", "to-universal", str(mid)],
                   check=True, env=env, capture_output=True, timeout=300)
    universal = mid.with_name(mid.name + "_universal")
    assert checkpoint.newest_complete(mid.parent) == two / "checkpoints" / "step_00000004"  # auto skips universal tags
    assert checkpoint.is_complete(universal) and (universal / "zero").is_dir()
    one = tmp_path / "one"
    r = pretrain(one, launch_dataset, "zero2.json", *method_args(method), "--resume", str(universal), ranks=1)
    assert "universal=True world_size=1" in r.stdout
    a, b = logged(two), logged(one)
    assert sorted(b) == [3, 4] and b[4]["samples_seen"] == 32
    assert checkpoint.is_complete(one / "checkpoints" / "step_00000004")
    keys = ["loss", *(f"loss_{t}" for t in get_spec(method).loss_terms)]
    for step, rel in ((3, 1e-6), (4, 1e-3)):
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], rel=rel), (step, key)
    assert a[1]["loss"] != a[4]["loss"]
    # The two runs' updates over steps 3-4 differ by < 1% of their norm (measured: 0.15-0.5%
    # for the five methods; with masks drawn per rank before micro_seed: 1.9% selectivemae, 8.6% simmim).
    w_mid = fp32_weights(mid)
    wa = fp32_weights(two / "checkpoints" / "step_00000004")
    wb = fp32_weights(one / "checkpoints" / "step_00000004")
    assert wa.keys() == wb.keys() == w_mid.keys()
    update_a = torch.cat([(wa[k] - w_mid[k]).flatten() for k in wa])
    update_b = torch.cat([(wb[k] - w_mid[k]).flatten() for k in wa])
    assert (update_b - update_a).norm() < 0.01 * update_a.norm()


def test_nonfinite_steps_are_skipped_then_rollback_then_stop(tmp_path: Path, launch_dataset: Path) -> None:
    """NaN injected at steps (0-based) 1, 3, 4, 5 with K = 2: step 1 is skipped and counted,
    the pair 3+4 triggers one rollback to the step-4 checkpoint, the repeat at 4+5 stops the run."""
    run = tmp_path / "nan"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = [str(BIN / "smae-pretrain"), "--config", str(DEMO), "--deepspeed_config",
           str(REPO / "ds_configs" / "cpu_smoke.json"), "--set", f"data.path={launch_dataset}", "--set", f"run_dir={run}",
           "--set", "train.steps=6", "--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep=10",
           "--set", "debug.nonfinite_at=[1,3,4,5]", "--set", "train.max_nonfinite=2", "--set", "optim.lr=1e-3",
           "--set", "train.picture_every=0"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode != 0
    assert "2 consecutive non-finite steps (train.max_nonfinite = 2) at step 6 after a rollback" in r.stderr
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 4 and rollbacks[0]["from_step"] == 5
    counts = [e["nonfinite_steps"] for e in events if "event" not in e]
    assert counts[:3] == [0, 1, 1]
    # The skipped step left the weights untouched; a good step changed them.
    ck = run / "checkpoints"
    w1, w2, w3 = (fp32_weights(ck / checkpoint.tag_for(s)) for s in (1, 2, 3))
    assert_same_weights(w1, w2)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
