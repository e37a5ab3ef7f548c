"""kill -9 during packing, rerun, and the result equals an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zarr
from PIL import Image

from data_prep.pack import PackConfig, pack
from selectivemae_ds.data.shards import ShardedDataset

REPO = Path(__file__).resolve().parents[1]
WORK = ".smae-pack-work"


def _records(out: Path) -> list[tuple[str, tuple[int, int], int, bytes]]:
    ds = ShardedDataset(out)
    return [(ds.source(i), ds.shape(i), ds.phash(i), ds.read(i)) for i in range(len(ds))]


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def _make_inputs(assets_dir: Path, root: Path) -> Path:
    """~40 inputs cut from the real scenes: PNG crops (re-encoded), JPEG crops (passed
    through), one large scene (sliced) and repeated crops under other names (dedup must
    see the same kept set before and after a kill)."""
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    with Image.open(assets_dir / "2019_YELL_2_528000_4978000_image_crop2_1536.jpg") as im:
        scene = im.convert("RGB")
    rng = random.Random(7)
    for i in range(34):
        side = rng.randrange(300, 700)
        x, y = rng.randrange(0, 1536 - side), rng.randrange(0, 1536 - side)
        crop = scene.crop((x, y, x + side, y + side))
        if i % 5 == 0:
            crop.save(src / f"c{i:02d}.jpg", quality=90)
        else:
            crop.save(src / "sub" / f"c{i:02d}.png", compress_level=1)
            if i % 7 == 0:
                crop.save(src / f"dup{i:02d}.png", compress_level=1)
    scene.crop((0, 0, 1300, 1100)).save(src / "big.png", compress_level=1)
    return src


def _visible_shards_are_complete(out: Path) -> None:
    """A shard dir under its final name must be whole: a half-written one never shows."""
    for d in sorted(out.glob("shard-*.zarr")):
        g = zarr.open_group(str(d), mode="r")
        off = np.asarray(g["offsets"][:])
        assert off.shape == (g.attrs["count"] + 1,)
        assert g["bytes"].shape == (int(off[-1]),)
        assert g["source"].shape == (g.attrs["count"],)


def _run_until(cmd: list[str], out: Path, condition: Callable[[], bool]) -> bool:
    """Start the CLI, SIGKILL its main process as soon as ``condition`` holds; return
    True when it was killed before finishing."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed = False
    try:
        while proc.poll() is None:
            if condition():
                proc.send_signal(signal.SIGKILL)  # the main process only, like `kill -9 PID`
                killed = True
                break
            time.sleep(0.005)
        proc.wait(timeout=120)
        if killed:
            # Orphaned pool workers must notice and exit on their own (worker watchdog).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("orphaned worker processes survived the killed main process")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed and proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_at_several_moments_then_rerun_equals_uninterrupted(tmp_path: Path, assets_dir: Path) -> None:
    src = _make_inputs(assets_dir, tmp_path)
    ref = tmp_path / "ref"
    pack(PackConfig(sources=[str(src)], out=ref, workers=1, images_per_shard=3, progress=False))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.cli", str(src), "--out", str(out), "--workers", "2",
           "--images-per-shard", "3", "--quiet"]
    work = out / WORK

    def some_batches() -> bool:
        return len(list(work.glob("batches/*/b-*.json"))) >= 3

    def shards_at_least(n: int) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return len(json.loads((work / "shards.json").read_text())["shards"]) >= n
            except (FileNotFoundError, json.JSONDecodeError):
                return False
        return check

    # Three kill points: while batches are being computed, right after the first shard
    # is logged, and at a random later shard (the moment inside that step is random too:
    # the poll races the writer).
    kills = 0
    for condition in (some_batches, shards_at_least(1), shards_at_least(random.Random(5).randint(3, 7))):
        if (out / "manifest.json").is_file() and not work.exists():
            break  # already finished: nothing left to interrupt
        if _run_until(cmd, out, condition):
            kills += 1
            assert not ((out / "manifest.json").is_file() and not work.exists())
            _visible_shards_are_complete(out)
    assert kills >= 2, "the run finished before it could be interrupted"

    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resume" in res.stdout or "already complete" in res.stdout
    assert not work.exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [".lock", "manifest.json"]
    assert _records(out) == _records(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    stats = _manifest(ref)["stats"]
    assert stats["skipped"]["duplicate"] == 4 and stats["sliced"] == 1
