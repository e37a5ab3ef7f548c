"""The README's first command: pack the bundled images and pretrain the demo through the deepspeed launcher."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from selectivemae_ds import checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_packs_trains_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    env = dict(os.environ, DS_ACCELERATOR="cpu", SMAE_DEMO_OUT=str(out))
    r = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = out / "run"
    assert f"[demo] run: {run}" in r.stdout and "[done] checkpoint:" in r.stdout
    final = run / "checkpoints" / "step_00000008"
    assert checkpoint.is_complete(final)
    assert checkpoint.read_client_state(final)["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "event" not in rec]
    assert [rec["step"] for rec in steps] == list(range(1, 9))
    assert {rec["psts_stage"] for rec in steps} == {"near", "far", "random"}
    assert all(rec["nonfinite_steps"] == 0 for rec in steps)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.toml").is_file()
