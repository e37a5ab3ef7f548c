"""Shared helpers of the reliability suite: one-rank trainer launches with fault keys,
metrics reading, and byte flips in a packed dataset."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import zarr

from selectivemae_ds.data.shards import ShardedDataset
from tests.launch import BIN, DEMO, REPO


def train_one_rank(run_dir: Path, data: Path, *sets: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``smae-pretrain`` (one rank, cpu_smoke.json) on the demo model; ``sets`` are ``--set`` values."""
    cmd = [str(BIN / "smae-pretrain"), "--config", str(DEMO), "--deepspeed_config",
           str(REPO / "ds_configs" / "cpu_smoke.json"), "--set", f"data.path={data}", "--set", f"run_dir={run_dir}",
           "--set", "optim.lr=1e-3", "--set", "train.picture_every=0"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl (logs and events), in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def copy_dataset(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def flip_heap(root: Path, index: int, nbytes: int = 16) -> str:
    """XOR ``nbytes`` in the middle of record ``index``'s bytes; return its shard name."""
    ds = ShardedDataset(root)
    s, j = ds.locate(index)
    sh = ds.shard(s)
    a, b = int(sh.offsets[j]), int(sh.offsets[j + 1])
    lo = a + (b - a) // 2
    heap = zarr.open_array(str(root / sh.name / "bytes"), mode="r+")
    heap[lo:lo + nbytes] = np.bitwise_xor(np.asarray(heap[lo:lo + nbytes]), 0xFF)
    name = sh.name
    ds.close()
    return name


def flip_offset(root: Path, shard: str, local: int) -> None:
    """XOR the low byte of offsets[local + 1] of ``shard`` (record ``local`` ends elsewhere)."""
    arr = zarr.open_array(str(root / shard / "offsets"), mode="r+")
    arr[local + 1] = int(arr[local + 1]) ^ 0x5A


def pretrain_cmd(run_dir: Path, data: Path, ds_json: str, *extra: str) -> list[str]:
    """The 2-rank ``deepspeed`` command of ``tests.launch.pretrain`` (same steps, cadence and lr,
    so its final weights are comparable with the session's ``straight_run``)."""
    from tests.launch import DEMO_SETS, free_port, set_args

    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            str(REPO / "launcher" / "pretrain.py"), "--config", str(DEMO),
            "--deepspeed_config", str(REPO / "ds_configs" / ds_json), "--set", f"data.path={data}",
            "--set", f"run_dir={run_dir}", *set_args(DEMO_SETS), *extra]


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the trainer process of ``rank`` (its command line holds ``--local_rank=RANK``
    and ``run_dir``), or None while it does not exist."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--local_rank={rank}".encode() in args and f"run_dir={run_dir}".encode() in args:
            return int(proc.name)
    return None


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a log record so far (a torn last line is ignored)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" not in rec:
            steps.append(int(rec["step"]))
    return steps
