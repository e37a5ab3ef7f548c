"""Multi-node packing on a real SLURM: the one-node cluster of ``slurm_cluster.py`` (three CPU
slots), ``launcher/pack_slurm.sh`` submitting the part array and the dependent
merge with ``sbatch``, and the merged dataset checked against the single-node pack.

Skipped, with the reason, where the packages are not installed (``.ci/run`` installs them)
or the test does not run as root (slurmd starts jobs as their owner).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.pack import PackConfig, pack
from tests.launch import REPO
from tests.reliability.slurm_cluster import SKIP_UNLESS_SLURM, SLOTS, job_state, queue, wait_done
from tests.test_pack_parts import _assert_adds_up, _records

pytestmark = [pytest.mark.slow, SKIP_UNLESS_SLURM]


def test_slurm_array_parts_and_dependent_merge_equal_single_node(slurm: dict[str, str], tmp_path: Path,
                                                                  assets_dir: Path) -> None:
    single = tmp_path / "single"
    pack(PackConfig(sources=[str(assets_dir)], out=single, workers=1, images_per_shard=4, progress=False))
    out, logs = tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    env = dict(slurm, LOG_DIR=str(logs), CPUS_PER_PART="1", SMAE_PACK=f"{sys.executable} -m data_prep.cli",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run(["bash", "launcher/pack_slurm.sh", str(SLOTS), str(out), str(assets_dir),
                          "--images-per-shard", "4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    m = re.fullmatch(r"parts: job (\d+) \(array 0-2\); merge: job (\d+) \(runs after every part succeeds\)\n",
                     res.stdout)
    assert m, res.stdout
    parts_job, merge_job = m.groups()
    state = wait_done(env, merge_job, timeout=300)
    assert state == "COMPLETED", queue(env) + "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(logs.iterdir()))
    assert job_state(env, parts_job) == "COMPLETED"

    assert sorted(p.name for p in logs.glob("*.json")) == [
        "smae-pack-merge.json"] + [f"smae-pack-part-{i}-of-3.json" for i in range(3)]
    part_reports = [json.loads((logs / f"smae-pack-part-{i}-of-3.json").read_text()) for i in range(3)]
    merged = json.loads((logs / "smae-pack-merge.json").read_text())
    assert [r["part"] for r in part_reports] == ["0/3", "1/3", "2/3"]
    assert [p["packed"] for p in merged["parts"]] == [r["packed"] for r in part_reports]
    _assert_adds_up(merged, single)
    assert _records(out) == _records(single)
    merge_log = next(logs.glob("smae-pack-merge-*.out")).read_text()
    assert "verify " in merge_log and "OK, 13 records" in merge_log, merge_log
