"""Multi-node packing: ``smae-pack --part I/N`` then ``smae-pack merge`` reads exactly like a
single-node pack of the same inputs (records, bytes, sources, order, stats), for n in
{1, 2, 3}, on the bundled images and on inputs with near-duplicates planted across the
part boundaries; refusals name what is wrong; a part killed with its process group and
rerun changes nothing."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zarr
from PIL import Image

from data_prep.images import PackOptions, process_image
from data_prep.merge import MergeConfig, merge
from data_prep.pack import PackConfig, pack
from data_prep.parts import parse_part, part_dir_name, share_bounds
from data_prep.verify import verify_dataset
from selectivemae_ds.data.shards import RecordCorruptError, ShardedDataset, ShardFormatError
from selectivemae_ds.errors import ConfigError, DataError, RunError
from selectivemae_ds.locking import DirLock
from tests.launch import REPO
from tests.shard_fixtures import corrupt_record

PER_SHARD = 3


def _records(root: Path) -> list[tuple[str, tuple[int, int], int, bytes]]:
    ds = ShardedDataset(root)
    return [(ds.source(i), ds.shape(i), ds.phash(i), ds.read(i)) for i in range(len(ds))]


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def _config(src: Path, out: Path, part: tuple[int, int] | None = None, **kw: Any) -> PackConfig:
    return PackConfig(sources=[str(src)], out=out, workers=1, images_per_shard=PER_SHARD, progress=False,
                      part=part, **kw)


def _pack_parts(src: Path, out: Path, n: int) -> list[dict[str, Any]]:
    return [pack(_config(src, out, (i, n))) for i in range(n)]


def _merged_two_parts(src: Path, out: Path) -> Path:
    """``src`` packed as parts 0/2 and 1/2 into ``out``, then merged."""
    _pack_parts(src, out, 2)
    merge(MergeConfig(out, progress=False))
    return out


def _hash_of_png(im: Image.Image) -> int:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return process_image(buf.getvalue(), "x.png", PackOptions()).records[0].phash


def _bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> tuple[Path, Path]:
    """12 inputs with near-duplicates planted across the part boundaries of n = 2 (after
    input 5) and n = 3 (after inputs 3 and 7), and the single-node pack of them.

    A (i00) and B (i06) are 4 bits apart, B and C (i07) 2 bits, A and C 6: single-node
    keeps A, drops B, keeps C. A part holding B and C but not A keeps B and drops C, so
    the merge must drop B (A's duplicate, across parts) and restore C. Exact copies sit
    on both sides of boundaries: i04 = i03, i05 = i01 and i08 = C each in the part after
    their original at n = 3; i11 = A in the last part (at n = 2 B, a part-local kept
    record, drops it first). i02 = i01 inside part 0, i09 is sliced into 4 tiles and i10
    is corrupt.
    """
    root = tmp_path_factory.mktemp("planted")
    src = root / "src"
    src.mkdir()
    with Image.open(assets_dir / "2019_YELL_2_528000_4978000_image_crop2_1536.jpg") as im:
        scene = im.convert("RGB")

    def crop(x: int, y: int, side: int = 400) -> Image.Image:
        return scene.crop((x, y, x + side, y + side))

    a, b, c = crop(300, 300), crop(302, 300), crop(304, 300)
    ha, hb, hc = (_hash_of_png(x) for x in (a, b, c))
    assert (_bits(ha, hb), _bits(hb, hc), _bits(ha, hc)) == (4, 2, 6), "premise of the chain case"
    d, e = crop(900, 100), crop(100, 1000)
    images = {"i00": a, "i01": d, "i02": d, "i03": e, "i04": e, "i05": d, "i06": b, "i07": c, "i08": c,
              "i09": scene.crop((0, 0, 1300, 1100)), "i11": a}
    for name, im in images.items():
        im.save(src / f"{name}.png", compress_level=1)
    (src / "i10.png").write_bytes((src / "i01.png").read_bytes()[:5000])
    single = root / "single"
    pack(_config(src, single))
    return src, single


@pytest.fixture(scope="module")
def neon_single(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("neon") / "single"
    pack(_config(assets_dir, out))
    return out


def _assert_adds_up(report: dict[str, Any], single: Path) -> None:
    """The merge's counts equal the single-node run's, and equal the parts' counts once
    the near-duplicates across parts are accounted for."""
    want = _manifest(single)["stats"]
    parts = report["parts"]
    across = report["across_parts"]
    for key in ("inputs", "packed", "sliced", "passthrough", "skipped", "skipped_samples", "ignored_files"):
        assert report[key] == want[key], key
    assert sum(p["inputs"] for p in parts) == want["inputs"]
    assert sum(p["packed"] for p in parts) - across["removed"] + across["restored"] == want["packed"]
    for reason, count in want["skipped"].items():
        from_parts = sum(p["skipped"][reason] for p in parts)
        if reason == "duplicate":
            from_parts += across["removed"] - across["restored"]
        assert from_parts == count, reason


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bundled_images_merge_equals_single_node(tmp_path: Path, assets_dir: Path, neon_single: Path,
                                                 n: int) -> None:
    out = tmp_path / "multi"
    _pack_parts(assets_dir, out, n)
    report = merge(MergeConfig(out, progress=False))
    assert _records(out) == _records(neon_single)
    assert len(_records(out)) == 13
    assert _manifest(out)["stats"] == _manifest(neon_single)["stats"]
    _assert_adds_up(report, neon_single)
    res = verify_dataset(out)
    assert res.ok, res.problems
    assert res.records == 13


@pytest.mark.parametrize("n", [1, 2, 3])
def test_planted_duplicates_across_parts_merge_equals_single_node(tmp_path: Path, planted: tuple[Path, Path],
                                                                  n: int) -> None:
    src, single = planted
    out = tmp_path / "multi"
    part_reports = _pack_parts(src, out, n)
    report = merge(MergeConfig(out, progress=False))

    want = _records(single)
    assert [r[0] for r in want] == ["i00.png", "i01.png", "i03.png", "i07.png"] + [
        f"i09.png#{box}" for box in ("0,0,650,550", "650,0,1300,550", "0,550,650,1100", "650,550,1300,1100")]
    assert _records(out) == want
    assert _manifest(single)["stats"]["skipped"]["duplicate"] == 6
    assert _manifest(single)["stats"]["skipped"]["corrupt"] == 1
    _assert_adds_up(report, single)
    assert [r["packed"] for r in report["parts"]] == [r["packed"] for r in part_reports]
    # What the planted layout forces at each n: B (and at n = 3 the copies i04, i05, i08,
    # i11 of records in earlier parts) are removed across parts, C comes back.
    assert report["across_parts"] == {1: {"removed": 0, "restored": 0},
                                      2: {"removed": 1, "restored": 1},
                                      3: {"removed": 5, "restored": 1}}[n]
    assert verify_dataset(out).ok
    # No shard was rewritten: the merged manifest lists the parts' own shard directories
    # with the parts' digests, and the dropped records are excluded, not removed.
    merged = _manifest(out)["shards"]
    for entry in merged:
        part, name = entry["name"].split("/")
        own = {s["name"]: s for s in _manifest(out / part)["shards"]}[name]
        assert entry["index_sha256"] == own["index_sha256"]
        assert entry["count"] + len(entry.get("exclude", [])) == own["count"] + len(own.get("exclude", []))


def test_locate_maps_global_records_past_exclusions(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, single = planted
    out = _merged_two_parts(src, tmp_path / "multi")
    ds = ShardedDataset(out)
    sources_by_shard = {}
    for i in range(len(ds)):
        s, j = ds.locate(i)
        entry = ds.manifest["shards"][s]
        assert j not in entry.get("exclude", [])
        if s not in sources_by_shard:
            sources_by_shard[s] = zarr.open_group(str(out / entry["name"]), mode="r")["source"][:]
        assert sources_by_shard[s][j] == ds.source(i)
    assert [ds.source(i) for i in range(len(ds))] == [r[0] for r in _records(single)]


def test_corrupt_record_in_merged_dataset_named_by_global_index(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, _single = planted
    out = _merged_two_parts(src, tmp_path / "multi")
    ds = ShardedDataset(out)
    # Record 3 (i07.png, the restored C) sits between excluded records (B, a copy of C) in part 1's first shard.
    s, j = ds.locate(3)
    assert ds.source(3) == "i07.png" and ds.manifest["shards"][s]["exclude"] == [0, 2]
    assert (s, j) == (2, 1)
    ds.close()
    corrupt_record(out, 3)
    with pytest.raises(RecordCorruptError, match=rf"record 3 \(local {j}\): fails its crc32 check"):
        ShardedDataset(out).read(3)
    res = verify_dataset(out)
    assert len(res.problems) == 1 and f"record 3 (local {j}, source i07.png): fails its crc32" in res.problems[0]


def test_manifest_exclusions_are_checked(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, _single = planted
    out = _merged_two_parts(src, tmp_path / "multi")
    doc = _manifest(out)
    entry = next(e for e in doc["shards"] if e.get("exclude"))
    stored = entry["count"] + len(entry["exclude"])
    for bad in ([2, 1], [-1], ["0"]):
        broken = json.loads(json.dumps(doc))
        e = next(x for x in broken["shards"] if x["name"] == entry["name"])
        e["exclude"] = bad
        e["count"] = stored - len(bad)
        broken["count"] = sum(x["count"] for x in broken["shards"])
        (out / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ShardFormatError, match="malformed"):
            ShardedDataset(out)
    broken = json.loads(json.dumps(doc))
    s = next(k for k, x in enumerate(broken["shards"]) if x["name"] == entry["name"])
    broken["shards"][s]["exclude"] = [stored + 5]
    broken["shards"][s]["count"] = stored - 1
    broken["count"] = sum(x["count"] for x in broken["shards"])
    (out / "manifest.json").write_text(json.dumps(broken))
    ds = ShardedDataset(out)
    message = f"excludes local record {stored + 5} but the shard holds {stored} records"
    with pytest.raises(ShardFormatError, match=message):
        ds.read(int(ds._starts[s]))
    assert [p for p in verify_dataset(out).problems if message in p] == [f"{entry['name']}: the manifest {message}"]


def test_parts_dropped_duplicates_are_stored_and_excluded(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    """A part is a dataset of its own: its dedup drops are in its shards, excluded."""
    src, _single = planted
    out = tmp_path / "multi"
    rep = pack(_config(src, out, (1, 2)))
    part = out / part_dir_name(1, 2)
    ds = ShardedDataset(part)
    # Share 6..11: B, C, C, big (4 tiles), corrupt, A -> C, its copy and A are B's duplicates.
    assert [ds.source(i) for i in range(len(ds))] == ["i06.png"] + [
        f"i09.png#{box}" for box in ("0,0,650,550", "650,0,1300,550", "0,550,650,1100", "650,550,1300,1100")]
    assert rep["packed"] == 5 and rep["skipped"]["duplicate"] == 3 and rep["part"] == "1/2"
    assert [(s["count"], s.get("exclude", [])) for s in _manifest(part)["shards"]] == [(1, [1, 2]), (3, []),
                                                                                        (1, [1])]
    assert verify_dataset(part).ok


def test_merge_refuses_missing_unfinished_and_running_parts(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, single = planted
    out = tmp_path / "multi"
    out.mkdir()
    with pytest.raises(RunError, match="holds no part directory"):
        merge(MergeConfig(out, progress=False))
    pack(_config(src, out, (0, 3)))
    with pytest.raises(RunError, match=r"not every part is finished: 1/3 missing \(part-00001-of-00003 does not "
                                       r"exist\); 2/3 missing"):
        merge(MergeConfig(out, progress=False))
    pack(_config(src, out, (1, 3)))
    # Part 2 killed before its manifest: a work directory without manifest.json.
    (out / part_dir_name(2, 3) / ".smae-pack-work").mkdir(parents=True)
    with pytest.raises(RunError, match=r"2/3 unfinished \(no manifest.json: killed or failed; rerun its command"):
        merge(MergeConfig(out, progress=False))
    shutil.rmtree(out / part_dir_name(2, 3))
    pack(_config(src, out, (2, 3)))
    held = DirLock(out / part_dir_name(1, 3), "smae-pack --out")
    try:
        t = time.monotonic()
        with pytest.raises(RunError, match=rf"after waiting 0.5 s: not every part is finished: 1/3 running "
                                           rf"\(pid {os.getpid()} on "):
            merge(MergeConfig(out, wait=0.5, progress=False))
        assert time.monotonic() - t >= 0.5
    finally:
        held.release()
    assert not (out / "manifest.json").exists()
    report = merge(MergeConfig(out, progress=False))
    assert report["run"] == "merged" and _records(out) == _records(single)
    text = (out / "manifest.json").read_bytes()
    assert merge(MergeConfig(out, progress=False))["run"] == "already merged, unchanged"
    assert (out / "manifest.json").read_bytes() == text


def test_merge_waits_for_a_late_part(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, single = planted
    out = tmp_path / "multi"
    pack(_config(src, out, (0, 2)))
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", "merge", str(out), "--wait", "120", "--quiet"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        pack(_config(src, out, (1, 2)))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "smae-pack merge: 8 records from 12 inputs in 2 part(s)" in stdout
    assert _records(out) == _records(single)


def test_merge_refuses_parts_of_different_plans(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, _single = planted
    out = tmp_path / "multi"
    pack(_config(src, out, (0, 2)))
    pack(_config(src, out, (1, 2), dedup_distance=0))
    with pytest.raises(ConfigError, match=r"part 1/2 \(part-00001-of-00002\) was packed from other inputs or "
                                          "options than part 0/2"):
        merge(MergeConfig(out, progress=False))
    pack(_config(src, out, (0, 3)))
    with pytest.raises(ConfigError, match=r"parts of packs split different ways \(of \[2, 3\]\)"):
        merge(MergeConfig(out, progress=False))


def test_single_node_and_parts_do_not_share_a_directory(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, single = planted
    out = tmp_path / "multi"
    pack(_config(src, out, (0, 2)))
    with pytest.raises(ConfigError, match=r"holds parts of a multi-node pack \(part-00000-of-00002\); merge them"):
        pack(_config(src, out))
    with pytest.raises(ConfigError, match="holds a single-node dataset; parts"):
        pack(_config(src, single, (0, 2)))
    with pytest.raises(ConfigError, match="holds a single-node dataset"):
        merge(MergeConfig(single, progress=False))


@pytest.mark.parametrize("spec, message", [
    ("3/3", "I must be 0..2"), ("-1/2", "expected I/N"), ("a/b", "expected I/N"), ("0/0", "N must be 1..99999"),
    ("1", "expected I/N"),
])
def test_bad_part_is_a_config_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_part(spec)


def test_bad_part_on_the_command_line_exits_2(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, _single = planted
    res = subprocess.run([sys.executable, "-m", "data_prep.cli", str(src), "--out", str(tmp_path / "o"),
                          "--part", "2/2", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "config error: --part 2/2: I must be 0..1" in res.stderr
    assert not (tmp_path / "o").exists()


def test_share_bounds_tile_the_inputs() -> None:
    for total in (0, 1, 7, 12, 1000):
        for n in (1, 2, 3, 7, 16):
            bounds = [share_bounds(total, i, n) for i in range(n)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_empty_share_and_all_skipped_merge(tmp_path: Path) -> None:
    """More parts than inputs: empty shares are valid parts; a merge with no record at all
    is a data error, as a single-node run would be."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    out = tmp_path / "multi"
    reports = [pack(_config(src, out, (i, 2))) for i in range(2)]
    assert [r["inputs"] for r in reports] == [0, 1]
    with pytest.raises(DataError, match=r"no records: every one of the 1 input\(s\) was skipped \(not_image=1\)"):
        merge(MergeConfig(out, progress=False))


@pytest.mark.slow
def test_part_killed_with_its_process_group_then_rerun(tmp_path: Path, planted: tuple[Path, Path]) -> None:
    src, single = planted
    out = tmp_path / "multi"
    cmd = [sys.executable, "-m", "data_prep.cli", str(src), "--out", str(out), "--workers", "2",
           "--images-per-shard", str(PER_SHARD), "--part", "1/3", "--quiet"]
    part = out / part_dir_name(1, 3)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if list((part / ".smae-pack-work").glob("batches/*/b-*.json")):
                os.killpg(proc.pid, signal.SIGKILL)  # the main process and its pool workers, like a lost node
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, "the part finished before it could be killed"
    assert not (part / "manifest.json").exists()
    for i in (0, 2):
        pack(_config(src, out, (i, 3)))
    merge_cmd = [sys.executable, "-m", "data_prep.cli", "merge", str(out), "--quiet"]
    res = subprocess.run(merge_cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 5
    assert "1/3 unfinished (no manifest.json: killed or failed; rerun its command to resume it)" in res.stderr
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "smae-pack: part 1/3: packed" in res.stdout and "(resumed run," in res.stdout
    res = subprocess.run(merge_cmd + ["--report", str(tmp_path / "merge.json")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert _records(out) == _records(single)
    _assert_adds_up(json.loads((tmp_path / "merge.json").read_text()), single)
    res = subprocess.run([sys.executable, "-m", "data_prep.cli", "verify", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "OK, 8 records" in res.stdout, res.stdout + res.stderr
