"""Packing: ``smae-pack`` killed like a lost node (SIGKILL to the whole process group: the
main process and its pool workers at once), rerun, compared with an uninterrupted run.

``tests/test_pack_resume.py`` kills the main process alone at three moments (orphaned
workers must exit on their own); here every process dies at once, at a chosen moment in
CI and at random times with ``--heavy-trials N``. The rerun must give identical records,
in identical order, and an identical manifest.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.pack import PackConfig, pack
from tests.launch import REPO
from tests.test_pack_resume import WORK, _make_inputs, _records, _visible_shards_are_complete


@pytest.fixture(scope="module")
def inputs_and_reference(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> tuple[Path, Path, float]:
    """(inputs, uninterrupted output, seconds the CLI took for it)."""
    root = tmp_path_factory.mktemp("packkill")
    src = _make_inputs(assets_dir, root)
    ref = root / "ref"
    pack(PackConfig(sources=[str(src)], out=ref, workers=1, images_per_shard=3, progress=False))
    t = time.monotonic()
    timed = root / "timed"
    subprocess.run(_cmd(src, timed), cwd=REPO, check=True, capture_output=True, timeout=300)
    return src, ref, time.monotonic() - t


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", str(src), "--out", str(out), "--workers", "2",
            "--images-per-shard", "3", "--quiet"]


def kill_group_after(src: Path, out: Path, seconds: float) -> bool:
    """Start the CLI in its own process group, SIGKILL the group after ``seconds``; True when
    it was still running then."""
    proc = subprocess.Popen(_cmd(src, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return True


def rerun_and_compare(src: Path, out: Path, ref: Path) -> str:
    _visible_shards_are_complete(out)
    res = subprocess.run(_cmd(src, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not (out / WORK).exists()
    assert _records(out) == _records(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    return res.stdout


@pytest.mark.slow
def test_node_loss_mid_pack_then_rerun_equals_uninterrupted(tmp_path: Path,
                                                             inputs_and_reference: tuple[Path, Path, float]) -> None:
    src, ref, seconds = inputs_and_reference
    out = tmp_path / "out"
    assert kill_group_after(src, out, 0.5 * seconds), "the pack finished before half its usual time"
    stdout = rerun_and_compare(src, out, ref)
    assert "resume" in stdout


@pytest.mark.heavy
def test_node_loss_at_random_moments(tmp_path: Path, inputs_and_reference: tuple[Path, Path, float],
                                     heavy_trials: int, heavy_seed: int) -> None:
    """Each trial kills one fresh pack at a uniformly random time of its usual duration, and
    a second kill hits half the trials' reruns too before the final rerun."""
    src, ref, seconds = inputs_and_reference
    rng = random.Random(heavy_seed)
    killed = 0
    for i in range(heavy_trials):
        out = tmp_path / f"t{i:03d}"
        killed += kill_group_after(src, out, rng.uniform(0.05, 1.0) * seconds)
        if i % 2:
            killed += kill_group_after(src, out, rng.uniform(0.05, 0.8) * seconds)
        rerun_and_compare(src, out, ref)
    print(f"[summary] {heavy_trials} pack trials, {killed} kills, every rerun identical to the reference", flush=True)
    assert killed >= heavy_trials // 2
