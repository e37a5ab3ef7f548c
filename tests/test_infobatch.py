"""InfoBatch: the epoch plan as a pure function, pruned share, loss rescale, the unpruned tail, the table's
checkpoint slices; and (slow) exact resume and resume on another world size through the launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selectivemae_ds.data import order
from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.infobatch import InfoBatch, prune_plan, pruning_active, shard_name
from selectivemae_ds.errors import CheckpointError, ConfigError


def _scores(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 1.2, n).astype(np.float32)


def _table(n: int = 100, **kw: object) -> InfoBatch:
    args: dict[str, object] = {"n": n, "seed": 3, "ratio": 0.5, "delta": 0.875, "total_epochs": 8.0}
    args.update(kw)
    return InfoBatch(**args)  # type: ignore[arg-type]


def test_plan_is_a_pure_function_of_seed_epoch_and_scores() -> None:
    scores = _scores(1000)
    keep, weights = prune_plan(5, 2, scores, ratio=0.5, active=True)
    again_keep, again_weights = prune_plan(5, 2, scores.copy(), ratio=0.5, active=True)
    assert np.array_equal(keep, again_keep) and np.array_equal(weights, again_weights)
    assert not np.array_equal(keep, prune_plan(5, 3, scores, ratio=0.5, active=True)[0]), "epochs must differ"
    assert not np.array_equal(keep, prune_plan(6, 2, scores, ratio=0.5, active=True)[0]), "seeds must differ"
    # Same scores, another table object, another history of calls: same plan and order.
    a, b = _table(1000, seed=5), _table(1000, seed=5)
    a.live = torch.from_numpy(scores)
    b.live = torch.from_numpy(scores.copy())
    b.plan(0)
    plan_a, plan_b = a.plan(2), b.plan(2)
    assert np.array_equal(plan_a.order, plan_b.order) and np.array_equal(plan_a.weights, plan_b.weights)
    perm = order.epoch_permutation(5, 2, 1000)
    assert np.array_equal(plan_a.order, perm[keep[perm]]), "the pruned order is the permutation minus the pruned"


def test_pruned_fraction_follows_the_rule() -> None:
    scores = _scores(1000)
    scores[:10] = np.nan  # never scored: out of the mean, never pruned
    mean = float(np.nanmean(scores.astype(np.float64)))
    below = np.isfinite(scores) & (scores < mean)
    keep, _ = prune_plan(1, 4, scores, ratio=0.5, active=True)
    n_below = int(below.sum())
    assert keep[~below].all(), "records at or above the mean and unscored ones are all kept"
    assert int(keep[below].sum()) == int(0.5 * n_below)
    assert int((~keep).sum()) == n_below - int(0.5 * n_below)
    keep3, _ = prune_plan(1, 4, scores, ratio=0.3, active=True)
    assert int(keep3[below].sum()) == int(0.7 * n_below)
    # Nothing scored yet (the first epoch): nothing to prune.
    assert prune_plan(1, 0, np.full(50, np.nan, np.float32), ratio=0.5, active=True)[0].all()
    # The kept well-learned records are a fair draw: over epochs each is kept about half the time.
    kept = np.mean([prune_plan(1, e, scores, ratio=0.5, active=True)[0][below] for e in range(200)], axis=0)
    assert 0.4 < kept.mean() < 0.6 and kept.min() > 0.25 and kept.max() < 0.75


def test_rescale_values_and_weighted_loss() -> None:
    scores = _scores(400)
    keep, weights = prune_plan(2, 1, scores, ratio=0.5, active=True)
    below = scores < scores.astype(np.float64).mean()
    assert set(np.unique(weights).tolist()) == {1.0, 2.0}
    assert np.array_equal(weights == 2.0, keep & below), "weight 1/(1-0.5) exactly on the kept well-learned"
    _, w3 = prune_plan(2, 1, scores, ratio=0.25, active=True)
    assert np.allclose(np.unique(w3), [1.0, 1 / 0.75])
    per_sample = torch.tensor([0.5, 1.0, 2.0, 4.0])
    loss = _table().weighted_loss(per_sample, np.array([1.0, 2.0, 1.0, 2.0], np.float32))
    assert loss.item() == pytest.approx((0.5 + 2.0 + 2.0 + 8.0) / 4)
    ones = _table().weighted_loss(per_sample, np.ones(4, np.float32))
    assert torch.equal(ones, per_sample.mean()), "weight 1 leaves the model's loss bit-identical"


def test_pruning_is_off_in_the_last_eighth_of_the_epochs() -> None:
    assert [pruning_active(e, 8, 0.875) for e in range(8)] == [True] * 7 + [False]
    assert [pruning_active(e, 800, 0.875) for e in (0, 699, 700, 799)] == [True, True, False, False]
    table = _table(200, total_epochs=16.0)
    table.live = torch.from_numpy(_scores(200))
    for epoch in range(16):
        plan = table.plan(epoch)
        if epoch < 14:
            assert plan.pruned > 0 and plan.weights.max() == 2.0, f"epoch {epoch} should prune"
        else:
            assert plan.pruned == 0 and len(plan.order) == 200 and (plan.weights == 1.0).all(), f"epoch {epoch}"


def test_plan_uses_the_table_as_it_was_when_the_epoch_began() -> None:
    table = _table(300)
    table.live = torch.from_numpy(_scores(300))
    first = table.plan(1)
    table.record(torch.full((8,), 9.0), np.arange(8))  # losses arriving during epoch 1
    assert np.array_equal(table.plan(1).order, first.order), "mid-epoch updates must not change the epoch"
    assert table.live[:8].eq(9.0).all()
    assert not np.array_equal(table.plan(2).order, first.order)
    with pytest.raises(ValueError, match="epoch 1 was asked for after epoch 2"):
        table.plan(1)


def test_record_keeps_the_old_score_for_non_finite_losses() -> None:
    table = _table(10)
    table.record(torch.tensor([1.0, 2.0, 3.0]), np.array([4, 2, 7]))
    table.record(torch.tensor([float("nan"), float("inf"), 5.0]), np.array([4, 2, 0]))
    got = table.live.numpy()
    assert got[[4, 2, 7, 0]].tolist() == [1.0, 2.0, 3.0, 5.0]
    assert np.isnan(got[[1, 3, 5, 6, 8, 9]]).all()
    with pytest.raises(ValueError, match="2 losses for a global batch of 3"):
        table.record(torch.ones(2), np.arange(3))


def test_resume_at_an_epoch_boundary_plans_from_the_complete_table(tmp_path: Path) -> None:
    """A checkpoint after an epoch's last step holds the previous epoch's snapshot; the next
    epoch is planned from the live table, exactly as the straight run does when it gets there."""
    straight = _table(200)
    straight.live = torch.from_numpy(_scores(200))
    straight.plan(1)
    straight.record(torch.linspace(0.1, 2.0, 50), np.arange(50))  # the rest of epoch 1
    _save([straight], tmp_path)
    resumed = _table(200)
    resumed.load(tmp_path)
    assert resumed.snapshot_epoch == 1
    a, b = straight.plan(2), resumed.plan(2)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.weights, b.weights)


def _save(tables: list[InfoBatch], tag: Path) -> None:
    for t in tables:
        for name, data in t.shard().items():
            (tag / name).write_bytes(data)


@pytest.mark.parametrize("save_world, load_world", [(2, 1), (2, 3), (1, 2), (3, 3)])
def test_checkpoint_slices_round_trip_across_world_sizes(tmp_path: Path, save_world: int, load_world: int) -> None:
    n = 101
    live = _scores(n)
    live[[3, 50]] = np.nan
    tables = []
    for rank in range(save_world):
        t = _table(n, rank=rank, world_size=save_world)
        t.live = torch.from_numpy(live.copy())
        t.plan(0)
        t.plan(2)  # snapshot of epoch 2
        t.live = torch.from_numpy(live * 2)  # then updates
        tables.append(t)
    _save(tables, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [shard_name(r, save_world) for r in range(save_world)]
    for rank in range(load_world):
        back = _table(n, rank=rank, world_size=load_world)
        back.load(tmp_path)
        assert back.snapshot_epoch == 2
        np.testing.assert_array_equal(back.live.numpy(), live * 2)
        np.testing.assert_array_equal(back.snapshot, live)
        assert np.array_equal(back.plan(2).order, tables[0].plan(2).order)


def test_checkpoint_slices_are_checked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no InfoBatch score table"):
        _table().load(tmp_path)
    _save([_table(rank=r, world_size=2) for r in range(2)], tmp_path)
    with pytest.raises(CheckpointError, match="ratio was 0.5 in the checkpoint and is 0.25 now"):
        _table(ratio=0.25).load(tmp_path)
    with pytest.raises(CheckpointError, match="total_epochs was 8.0 in the checkpoint and is 9.0 now"):
        _table(total_epochs=9.0).load(tmp_path)
    (tmp_path / shard_name(1, 2)).unlink()
    with pytest.raises(CheckpointError, match="one InfoBatch slice per saving rank"):
        _table().load(tmp_path)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cfg = DataConfig(path=str(tmp_path))
    cfg.validate()
    assert cfg.infobatch is False, "off by default"
    for key, value in (("infobatch_ratio", 0.0), ("infobatch_ratio", 0.95), ("infobatch_delta", 0.0),
                       ("infobatch_delta", 1.5)):
        with pytest.raises(ConfigError, match=f"data.{key}: .* got {value}"):
            DataConfig(path=str(tmp_path), **{key: value}).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train.epochs: InfoBatch needs"):
        _table(total_epochs=0.0)


# ---------------------------------------------------------------- through the launcher (slow)

# 40 records, global batch 8: epoch 0 has 5 steps (nothing scored yet), epoch 1 is pruned
# (delta 1.0: every epoch may prune). Checkpoints after steps 3, 6 (inside the pruned epoch) and the last.
INFOBATCH_RUN = ("--set", "data.infobatch=true", "--set", "data.infobatch_delta=1.0", "--set", "train.steps=0",
                 "--set", "train.epochs=2", "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep=20",
                 "--set", "train.picture_every=0")
# About 9 steps, 3 checkpoints and a DALI rebuild per epoch: longer than the 4-step launches.
LAUNCH_TIMEOUT = 1200


def _loaded(tag: Path) -> InfoBatch:
    table = InfoBatch(n=40, seed=0, ratio=0.5, delta=1.0, total_epochs=2.0)
    table.load(tag / "rank_state")
    return table


def _table_of(tag: Path) -> np.ndarray:
    return _loaded(tag).live.numpy()


@pytest.fixture(scope="module")
def infobatch_straight(tmp_path_factory: pytest.TempPathFactory, launch_dataset: Path) -> Path:
    from tests.launch import pretrain

    run = tmp_path_factory.mktemp("infobatch") / "straight"
    pretrain(run, launch_dataset, "zero2.json", *INFOBATCH_RUN, timeout=LAUNCH_TIMEOUT)
    return run


def _final_tag(run: Path) -> Path:
    from selectivemae_ds import checkpoint

    tag = checkpoint.newest_complete(run / "checkpoints")
    assert tag is not None
    return tag


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_infobatch_exact_resume(tmp_path: Path, launch_dataset: Path, infobatch_straight: Path) -> None:
    from tests.launch import assert_same_weights, fp32_weights, logged, pretrain

    a = logged(infobatch_straight)
    last = max(a)
    assert 5 < last < 10, f"epoch 1 is pruned: fewer than 5 more steps after epoch 0's 5, got {last} in all"
    assert a[5]["epoch"] == 1.0 and a[last]["epoch"] == 2.0
    assert a[last]["samples_seen"] == 8 * last
    resume_step = 6  # the first step of pruned epoch 1 is done; the plan comes from the saved snapshot
    mid = infobatch_straight / "checkpoints" / f"step_{resume_step:08d}"
    resumed = tmp_path / "resumed"
    pretrain(resumed, launch_dataset, "zero2.json", *INFOBATCH_RUN, "--resume", str(mid), timeout=LAUNCH_TIMEOUT)
    b = logged(resumed)
    assert sorted(b) == list(range(resume_step + 1, last + 1))
    for step in b:
        assert b[step]["samples_seen"] == a[step]["samples_seen"] and b[step]["epoch"] == a[step]["epoch"]
        assert b[step]["loss"] == a[step]["loss"] and b[step]["lr"] == a[step]["lr"], f"step {step}"
    tag_a, tag_b = _final_tag(infobatch_straight), _final_tag(resumed)
    assert tag_a.name == tag_b.name
    assert_same_weights(fp32_weights(tag_a), fp32_weights(tag_b))
    np.testing.assert_array_equal(_table_of(tag_a), _table_of(tag_b))
    assert np.isfinite(_table_of(tag_a)).sum() == 40, "every record was scored in two epochs"


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_infobatch_resume_on_one_rank_through_universal(tmp_path: Path, launch_dataset: Path,
                                                        infobatch_straight: Path) -> None:
    from tests.launch import logged, pretrain

    mid = infobatch_straight / "checkpoints" / "step_00000006"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-m", "selectivemae_ds.checkpoint", "to-universal", str(mid)],
                   check=True, env=env, capture_output=True, timeout=300)
    universal = mid.with_name(mid.name + "_universal")
    assert sorted(p.name for p in (universal / "rank_state").iterdir()) == [shard_name(0, 2), shard_name(1, 2)]
    one = tmp_path / "one"
    pretrain(one, launch_dataset, "zero2.json", *INFOBATCH_RUN, "--resume", str(universal), ranks=1,
             timeout=LAUNCH_TIMEOUT)
    a, b = logged(infobatch_straight), logged(one)
    assert sorted(b) == list(range(7, max(a) + 1)), "the same pruned epoch, so the same number of steps"
    for step in b:
        assert b[step]["samples_seen"] == a[step]["samples_seen"] and b[step]["epoch"] == a[step]["epoch"]
        assert b[step]["lr"] == a[step]["lr"]
    # The first step after the resume runs the loaded weights on the same global batch: equal up to
    # float reduction order. Later steps drift apart by that reduction order (measured 0.3% at step 8).
    assert b[7]["loss"] == pytest.approx(a[7]["loss"], rel=1e-3)
    one_table, two_table = _loaded(_final_tag(one)), _loaded(_final_tag(infobatch_straight))
    # The epoch was planned from the merged 2-rank slices: the same snapshot, so the same pruning.
    assert one_table.snapshot_epoch == two_table.snapshot_epoch == 1
    np.testing.assert_array_equal(one_table.snapshot, two_table.snapshot)
    np.testing.assert_allclose(one_table.live.numpy(), two_table.live.numpy(), rtol=0.05)
    state = json.loads((_final_tag(one) / "client_state.json").read_text())
    assert state["loader"]["epoch"] == 2 and state["loader"]["infobatch"]["total_epochs"] == 2.0
