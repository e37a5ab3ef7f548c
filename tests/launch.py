"""Launch the trainer from tests: the demo model through `deepspeed` (or one process),
and read back what it logged and saved."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = REPO / "configs" / "demo.toml"
# The run of `pretrain` (with data.path and run_dir): 4 steps at lr 1e-3 (large enough that
# every step moves the weights), a checkpoint every 2 steps. Launches whose final weights
# are compared with the session's `straight_run` use the same values.
DEMO_SETS = ("train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep=5", "optim.lr=1e-3",
             "train.picture_every=2")


def set_args(sets: tuple[str, ...] | list[str]) -> list[str]:
    """``--set`` before each override."""
    return [a for s in sets for a in ("--set", s)]


DEMO_METHOD: str = tomllib.loads(DEMO.read_text())["model"]["method"]


def method_args(method: str) -> tuple[str, ...]:
    """The `--set` arguments that switch the demo run to `method` (none for the demo's own)."""
    return () if method == DEMO_METHOD else ("--set", f"model.method={method}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pretrain(run_dir: Path, data: Path, ds_json: str, *extra: str, ranks: int = 2,
             check: bool = True, timeout: int = 400) -> subprocess.CompletedProcess:
    """The demo model with DEMO_SETS; `extra` are more CLI arguments (later --set wins); `timeout` in seconds."""
    args = ["--config", str(DEMO), "--deepspeed_config", str(REPO / "ds_configs" / ds_json),
            "--set", f"data.path={data}", "--set", f"run_dir={run_dir}", *set_args(DEMO_SETS), *extra]
    port = free_port()
    if ranks == 1:
        cmd = [str(BIN / "smae-pretrain"), *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
               str(REPO / "launcher" / "pretrain.py"), *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if ranks > 1:
        # The trainer unlinks DeepSpeed's shared-memory all-reduce buffers once mapped.
        left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        assert not left, f"shared-memory buffers left behind: {left}"
    return r


def logged(run_dir: Path) -> dict[int, dict]:
    """step -> metrics record (the last one for a step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            out[rec["step"]] = rec
    return out


def fp32_weights(tag: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
