"""End-to-end tests of smae-pack on the bundled NEON images and on bad inputs made here."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image

from data_prep.cli import main as cli_main
from data_prep.pack import PackConfig, pack
from selectivemae_ds.data.shards import INDEX_ARRAYS, ShardedDataset, ShardFormatError, index_digest
from selectivemae_ds.errors import ConfigError

Record = tuple[str, tuple[int, int], int, bytes]

NEON_SOURCES = [
    "2019_YELL_2_528000_4978000_image_crop2_1536.jpg#0,0,768,768",
    "2019_YELL_2_528000_4978000_image_crop2_1536.jpg#768,0,1536,768",
    "2019_YELL_2_528000_4978000_image_crop2_1536.jpg#0,768,768,1536",
    "2019_YELL_2_528000_4978000_image_crop2_1536.jpg#768,768,1536,1536",
    "2019_YELL_2_541000_4977000_image_crop.jpg#0,0,624,517",
    "2019_YELL_2_541000_4977000_image_crop.jpg#624,0,1249,517",
    "2019_YELL_2_541000_4977000_image_crop.jpg#0,517,624,1035",
    "2019_YELL_2_541000_4977000_image_crop.jpg#624,517,1249,1035",
    "AWPE Pigeon Lake 2020 DJI_0005.JPG#0,0,529,997",
    "AWPE Pigeon Lake 2020 DJI_0005.JPG#529,0,1058,997",
    "OSBS_029.png",
    "SOAP_031.png",
    "SOAP_061.png",
]


def records(out: Path) -> list[Record]:
    ds = ShardedDataset(out)
    return [(ds.source(i), ds.shape(i), ds.phash(i), ds.read(i)) for i in range(len(ds))]


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def run_pack(sources: list[Path], out: Path, **kw: Any) -> dict[str, Any]:
    return pack(PackConfig(sources=[str(s) for s in sources], out=out, progress=False, **kw))


@pytest.fixture(scope="module")
def neon(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> tuple[Path, dict[str, Any], str]:
    """The bundled images packed once through the CLI (workers=1), with a report."""
    root = tmp_path_factory.mktemp("neon")
    out, report = root / "data", root / "report.json"
    buf = io.StringIO()
    stdout, sys.stdout = sys.stdout, buf
    try:
        rc = cli_main([str(assets_dir), "--out", str(out), "--workers", "1", "--quiet", "--report", str(report)])
    finally:
        sys.stdout = stdout
    assert rc == 0
    return out, json.loads(report.read_text()), buf.getvalue()


def test_bundled_images_counts_slicing_and_duplicate(neon: tuple[Path, dict[str, Any], str]) -> None:
    out, report, printed = neon
    assert report["packed"] == 13 and report["inputs"] == 7 and report["sliced"] == 3
    assert report["skipped"]["duplicate"] == 1
    assert report["skipped_samples"]["duplicate"] == [{"source": "OSBS_029.tif"}]
    assert {k: v for k, v in report["skipped"].items() if v} == {"duplicate": 1}
    for reason in ("corrupt", "too_small", "duplicate"):
        assert reason in report["skipped"]
    assert report["ignored_files"] == 6 and report["shards"] == 1 and report["seconds"] > 0
    assert "packed 13 records from 7 inputs" in printed and "duplicate=1" in printed
    recs = records(out)
    assert [r[0] for r in recs] == NEON_SOURCES
    for source, (h, w), _phash, data in recs:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (w, h)
            assert max(h, w) <= 1024 and min(h, w) >= 64
    assert recs[0][1] == (768, 768) and recs[8][1] == (997, 529)


def test_workers_do_not_change_the_output(tmp_path: Path, assets_dir: Path) -> None:
    run_pack([assets_dir], tmp_path / "w1", workers=1, images_per_shard=4)
    run_pack([assets_dir], tmp_path / "w2", workers=2, images_per_shard=4)
    assert records(tmp_path / "w1") == records(tmp_path / "w2")
    assert (tmp_path / "w1" / "manifest.json").read_bytes() == (tmp_path / "w2" / "manifest.json").read_bytes()
    m1 = manifest(tmp_path / "w1")
    assert len(m1["shards"]) == 4
    assert [s["count"] for s in m1["shards"]] == [4, 4, 4, 1]
    assert not (tmp_path / "w2" / ".smae-pack-work").exists()


def test_zip_and_tar_inputs_give_the_directory_records(tmp_path: Path, assets_dir: Path,
                                                       neon: tuple[Path, dict[str, Any], str]) -> None:
    names = sorted(p.name for p in assets_dir.iterdir())
    shuffled = names[:]
    random.Random(3).shuffle(shuffled)  # archive order must not matter, only member paths
    zpath = tmp_path / "neon.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n in shuffled:
            zf.write(assets_dir / n, arcname=n)
    expected = records(neon[0])
    for suffix, mode in (("tar", "w"), ("tar.gz", "w:gz")):
        tpath = tmp_path / f"neon.{suffix}"
        with tarfile.open(tpath, mode) as tf:
            for n in shuffled:
                tf.add(assets_dir / n, arcname=n)
        doc = run_pack([tpath], tmp_path / f"out-{suffix}")
        assert doc["packed"] == 13 and doc["skipped"]["duplicate"] == 1
        assert records(tmp_path / f"out-{suffix}") == expected
    doc = run_pack([zpath], tmp_path / "out-zip")
    assert doc["packed"] == 13 and doc["sliced"] == 3
    assert records(tmp_path / "out-zip") == expected


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height: a decompression-bomb stand-in."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _real_crop(assets_dir: Path, box: tuple[int, int, int, int], fmt: str) -> bytes:
    with Image.open(assets_dir / "SOAP_061.png") as im:
        crop = im.convert("RGB").crop(box)
    buf = io.BytesIO()
    crop.save(buf, format=fmt, quality=90) if fmt == "JPEG" else crop.save(buf, format=fmt)
    return buf.getvalue()


def test_bad_inputs_are_skipped_and_counted(tmp_path: Path, assets_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good_jpeg = _real_crop(assets_dir, (0, 0, 300, 300), "JPEG")
    (src / "good.jpg").write_bytes(good_jpeg)
    (src / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (src / "truncated.png").write_bytes(_real_crop(assets_dir, (0, 0, 200, 200), "PNG")[:3000])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.png").write_text("this is not an image\n")
    (src / "bomb.png").write_bytes(_png_header_claiming(200_000, 200_000))
    (src / "tiny.png").write_bytes(_real_crop(assets_dir, (0, 0, 40, 40), "PNG"))
    os.symlink(src / "missing.jpg", src / "dangling.jpg")
    (src / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip archive")
    (src / "readme.txt").write_text("ignored: not an image name")
    # Odd names: not UTF-8, a newline, spaces. Valid images: they must be packed.
    odd = _real_crop(assets_dir, (100, 100, 300, 260), "PNG")
    (src / os.fsdecode(b"caf\xe9.png")).write_bytes(odd)
    (src / "line\nbreak  name.png").write_bytes(_real_crop(assets_dir, (150, 0, 400, 130), "PNG"))
    # A truncated tar.gz: the member before the damage survives, the damage is counted.
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tf:
        for name, box in (("a.png", (0, 200, 200, 400)), ("b.png", (200, 200, 400, 400))):
            data = _real_crop(assets_dir, box, "PNG")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (src / "cut.tar.gz").write_bytes(tgz.getvalue()[: len(tgz.getvalue()) * 2 // 3])
    # A zip whose member bytes were damaged after writing: CRC check fails on read.
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("ok.png", _real_crop(assets_dir, (0, 100, 150, 250), "PNG"))
        zf.writestr("rot.png", _real_crop(assets_dir, (250, 100, 400, 250), "PNG"))
    zbytes = bytearray(zbuf.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(zbytes))).getinfo("rot.png")
    zbytes[info.header_offset + 30 + len("rot.png") + 500] ^= 0xFF
    (src / "rotten.zip").write_bytes(bytes(zbytes))

    out = tmp_path / "out"
    doc = run_pack([src], out, workers=1)
    skipped = doc["skipped"]
    assert skipped["corrupt"] == 2, doc["skipped_samples"]
    assert skipped["empty"] == 1
    assert skipped["not_image"] == 1
    assert skipped["too_large_pixels"] == 1
    assert skipped["too_small"] == 1
    assert skipped["unreadable"] == 1
    # broken.zip; in the cut tar.gz the member whose data is cut off and the damaged tail;
    # the zip member whose CRC fails.
    assert skipped["broken_archive"] == 4
    samples = {k: sorted(s["source"] for s in v) for k, v in doc["skipped_samples"].items()}
    assert samples["corrupt"] == ["truncated.jpg", "truncated.png"]
    assert samples["too_large_pixels"] == ["bomb.png"]
    assert samples["unreadable"] == ["dangling.jpg"]
    assert samples["broken_archive"] == ["broken.zip", "cut.tar.gz", "cut.tar.gz/b.png", "rotten.zip/rot.png"]
    assert doc["ignored_files"] == 1
    got = [r[0] for r in records(out)]
    assert got == ["caf\\xe9.png", "cut.tar.gz/a.png", "good.jpg", "line\nbreak  name.png", "rotten.zip/ok.png"]
    assert records(out)[2][3] == good_jpeg  # passthrough alongside the bad ones
    assert cli_main(["verify", str(out)]) == 0
    leftovers = [p.name for p in out.iterdir() if p.name not in ("manifest.json", "shard-00000.zarr", ".lock")]
    assert leftovers == []


def test_max_pixels_is_checked_before_decoding(tmp_path: Path, assets_dir: Path) -> None:
    from data_prep.images import PackOptions
    doc = run_pack([assets_dir], tmp_path / "o", options=PackOptions(max_pixels=1_000_000))
    # The three scenes above 1 Mpx are refused; the four 400x400 ones remain (one duplicate).
    assert doc["skipped"]["too_large_pixels"] == 3 and doc["packed"] == 3


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_verify_sound_then_flipped_heap_byte(tmp_path: Path, neon: tuple[Path, dict[str, Any], str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(neon[0], tmp_path / "d")
    assert cli_main(["verify", str(out)]) == 0
    assert "OK, 13 records in 1 shard" in capsys.readouterr().out
    group = zarr.open_group(str(out / "shard-00000.zarr"), mode="r+")
    off = group["offsets"][:]
    pos = int(off[5] + (off[6] - off[5]) // 2)
    group["bytes"][pos] = int(group["bytes"][pos]) ^ 0xFF
    assert cli_main(["verify", str(out)]) == 3
    err = capsys.readouterr().err
    assert "shard-00000.zarr: record 5 (local 5" in err and "crc32" in err


def test_verify_names_shard_and_record_for_bad_offsets(tmp_path: Path, neon: tuple[Path, dict[str, Any], str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(neon[0], tmp_path / "d")
    group = zarr.open_group(str(out / "shard-00000.zarr"), mode="r+")
    off = group["offsets"][:]
    off[3] = off[2]
    group["offsets"][:] = off
    assert cli_main(["verify", str(out)]) == 3
    err = capsys.readouterr().err
    assert "shard-00000.zarr: record 2 (local 2): inconsistent offsets: [" in err
    assert "index digest does not match" in err


def test_reader_refuses_inconsistent_offsets_and_unknown_schema(tmp_path: Path,
                                                                neon: tuple[Path, dict[str, Any], str]) -> None:
    out = _copy(neon[0], tmp_path / "d")
    group = zarr.open_group(str(out / "shard-00000.zarr"), mode="r+")
    off = group["offsets"][:]
    off[4] = off[6]  # decreasing afterwards
    group["offsets"][:] = off
    with pytest.raises(ShardFormatError, match="shard-00000.zarr: index digest does not match"):
        ShardedDataset(out).read(0)
    # Even with a digest that matches the damaged index, the offsets are refused.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["index_sha256"] = index_digest({k: np.asarray(group[k][:]) for k in INDEX_ARRAYS})
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"shard-00000.zarr: record 4 \(local 4\): inconsistent offsets"):
        ShardedDataset(out).read(0)
    manifest["schema"] = 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match="unknown schema 2"):
        ShardedDataset(out)
    assert cli_main(["verify", str(out)]) == 3


def test_rerun_is_idempotent_and_option_change_is_refused(tmp_path: Path, assets_dir: Path) -> None:
    out = tmp_path / "o"
    first = run_pack([assets_dir], out)
    before = records(out)
    again = run_pack([assets_dir], out)
    assert again["run"].startswith("already complete") and again["packed"] == first["packed"]
    assert records(out) == before
    with pytest.raises(ConfigError, match="--restart"):
        run_pack([assets_dir], out, images_per_shard=5)
    doc = run_pack([assets_dir], out, images_per_shard=5, restart=True)
    assert doc["shards"] == 3 and [r[3] for r in records(out)] == [r[3] for r in before]


def test_foreign_out_directory_is_refused(tmp_path: Path, assets_dir: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        run_pack([assets_dir], out)
    assert (out / "precious.txt").read_text() == "user data"


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("smae-pack")
    for args in (["--help"], ["verify", "--help"]):
        res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0
        assert "--out" in res.stdout if args == ["--help"] else "DIR" in res.stdout
    res = subprocess.run([str(exe), "/nonexistent-input", "--out", "/tmp/never"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "does not exist" in res.stderr
