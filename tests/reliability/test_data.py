"""Data rot: bytes flipped in a shard's heap and in its offsets.

``tests/test_pack.py`` checks ``verify`` on one flipped heap byte and one bad offset, and
``tests/test_pipeline.py`` the loader's substitution in-process; here the damage is spread
over both shards, ``verify`` must list every damaged record by shard and record, and the
trainer (a real launch) keeps going over rotten records with nan gradients mixed in, while
a shard whose index is damaged stops it with a message naming the shard.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.cli import main as pack_main
from selectivemae_ds.data.shards import ShardedDataset
from tests.reliability.faults import copy_dataset, flip_heap, flip_offset, records, train_one_rank

ROTTEN = [0, 5, 9, 14, 21, 26, 33, 38]  # both shards (20 records each)


@pytest.fixture(scope="module")
def rotten(tmp_path_factory: pytest.TempPathFactory, launch_dataset: Path) -> tuple[Path, dict[int, str]]:
    root = copy_dataset(launch_dataset, tmp_path_factory.mktemp("rot") / "data")
    return root, {i: flip_heap(root, i) for i in ROTTEN}


def test_verify_names_every_rotten_record(rotten: tuple[Path, dict[int, str]],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root, shards = rotten
    assert pack_main(["verify", str(root)]) == 3
    err = capsys.readouterr().err
    assert f"FAILED, {len(ROTTEN)} problem(s)" in err
    ds = ShardedDataset(root)
    for i in ROTTEN:
        local = ds.locate(i)[1]
        assert f"{shards[i]}: record {i} (local {local}, source " in err and "fails its crc32 check" in err
    assert set(shards.values()) == {"shard-00000.zarr", "shard-00001.zarr"}


def test_verify_names_shard_and_record_of_a_flipped_offset(tmp_path: Path, launch_dataset: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_dataset(launch_dataset, tmp_path / "d")
    flip_offset(root, "shard-00001.zarr", 6)
    assert pack_main(["verify", str(root)]) == 3
    err = capsys.readouterr().err
    # The flipped end of record 26 is also the start of record 27: both are named, whether the
    # offsets stay increasing (then both fail their crc32) or not (then the first bad record is named).
    assert "shard-00001.zarr: index digest does not match the manifest" in err
    assert ("shard-00001.zarr: record 26 (local 6" in err and "shard-00001.zarr: record 27 (local 7" in err) or \
        "shard-00001.zarr: record 26 (local 6): inconsistent offsets" in err
    assert "shard-00000.zarr" not in err


def test_trainer_keeps_going_over_rotten_records(tmp_path: Path, rotten: tuple[Path, dict[int, str]]) -> None:
    """5 steps (40 images = every record once, 8 of them rotten) and a NaN gradient at step 2:
    the run finishes, each rotten record is substituted and counted, the bad step is counted."""
    root, _ = rotten
    run = tmp_path / "run"
    r = train_one_rank(run, root, "train.steps=5", "checkpoint.every_steps=0", "debug.nonfinite_grad_at=[2]")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[done] checkpoint:" in r.stdout
    last = [e for e in records(run) if "event" not in e][-1]
    assert last["step"] == 5 and last["samples_seen"] == 40
    assert last["substituted"] == len(ROTTEN)
    assert last["nonfinite_steps"] == 1


def test_trainer_stops_naming_the_shard_with_a_damaged_index(tmp_path: Path, launch_dataset: Path) -> None:
    root = copy_dataset(launch_dataset, tmp_path / "d")
    flip_offset(root, "shard-00001.zarr", 6)
    r = train_one_rank(tmp_path / "run", root, "train.steps=5", "checkpoint.every_steps=0", timeout=300)
    assert r.returncode != 0
    assert "shard-00001.zarr: index digest does not match the manifest (index corrupted)" in r.stderr
