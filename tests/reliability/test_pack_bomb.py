"""Packing hostile inputs: a zip "bomb" and inputs that are not images.

The bomb is what a user met in the wild: a ~6 MB zip holding three members of 1.94 GB of
zeros each, named ``.png``. Before the fix every member was inflated in full before the
image check (38 s and 4.1 GB RSS per worker). Now the first 64 KiB are read, the missing
image signature ends the read, and the members are counted as ``not_image``. Two more
members carry a real PNG header in front of the zeros: one declares more pixels than
``--max-pixels`` (refused from the header), one declares 64x64 (refused once more bytes
arrive than any 64x64 image needs).

The zip is built streaming: a deflate block of 1 MiB of zeros, after a full flush, is the
same bytes every time, so a member is that block repeated, and its CRC comes from the
CRC-32 zero-extension operator (as zlib's ``crc32_combine``), never from gigabytes in memory.
The pack runs in a subprocess under an address-space limit, which reports its own peak RSS.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.launch import REPO

MIB = 1 << 20
ZERO_MIB = 1850  # 1.94e9 bytes per member
# The child's address space: ~0.6 GB for Python, numpy, zarr and Pillow, and room for a few
# 16 MiB reads; an unbounded reader fails at the first 1.94 GB member instead of swapping.
ADDRESS_SPACE_LIMIT = 5 << 29


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_zero_extend(crc: int, n_bytes: int) -> int:
    """``zlib.crc32(bytes(n_bytes), crc)`` in O(log n): the CRC register times the operator
    of n zero bytes, built by repeated squaring of the one-zero-bit operator."""
    op = [0xEDB88320] + [1 << (k - 1) for k in range(1, 32)]  # one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # one zero byte
    reg = crc ^ 0xFFFFFFFF
    while n_bytes:
        if n_bytes & 1:
            reg = _gf2_times(op, reg)
        op = _gf2_square(op)
        n_bytes >>= 1
    return reg ^ 0xFFFFFFFF


def _png_header(width: int, height: int) -> bytes:
    """PNG signature, IHDR declaring width x height, and the start of an IDAT chunk that
    claims the rest of the file: what a decoder sees of a bomb before any pixel."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0x7FFFFFF0) + b"IDAT"


def write_zero_bomb(path: Path, members: list[tuple[str, bytes]], zero_mib: int) -> None:
    """A zip whose members are ``head`` followed by ``zero_mib`` MiB of zeros, deflated."""
    zeros = bytes(MIB)
    central = []
    with open(path, "wb") as f:
        for name, head in members:
            co = zlib.compressobj(9, zlib.DEFLATED, -15)
            first = co.compress(head) + co.flush(zlib.Z_FULL_FLUSH)
            block = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
            last = co.flush(zlib.Z_FINISH)
            size = len(head) + zero_mib * MIB
            packed = len(first) + zero_mib * len(block) + len(last)
            crc = crc32_zero_extend(zlib.crc32(head), zero_mib * MIB)
            raw = name.encode()
            offset = f.tell()
            fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, packed, size)
            f.write(b"PK\x03\x04" + fields + struct.pack("<HH", len(raw), 0) + raw)
            f.write(first)
            for _ in range(zero_mib):
                f.write(block)
            f.write(last)
            central.append(b"PK\x01\x02" + struct.pack("<H", 20) + fields
                           + struct.pack("<HHHHHII", len(raw), 0, 0, 0, 0, 0, offset) + raw)
        start = f.tell()
        directory = b"".join(central)
        f.write(directory)
        f.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(central), len(central), len(directory), start, 0))


def test_zero_extension_matches_zlib() -> None:
    for head, n in ((b"", 1), (b"abc", 1000), (b"\x89PNG", MIB + 7)):
        assert crc32_zero_extend(zlib.crc32(head), n) == zlib.crc32(head + bytes(n))


def test_small_bomb_is_a_valid_zip(tmp_path: Path) -> None:
    import zipfile
    path = tmp_path / "small.zip"
    write_zero_bomb(path, [("a.png", b""), ("b.png", _png_header(64, 64))], 3)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert zf.read("b.png") == _png_header(64, 64) + bytes(3 * MIB)


CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
from data_prep.pack import PackConfig, pack
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.monotonic()
doc = pack(PackConfig(sources=[sys.argv[1]], out=sys.argv[2], workers=1, progress=False))
seconds = time.monotonic() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_growth_kib": after - before, "seconds": seconds, "doc": doc}))
"""


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory, assets_dir: Path) -> Path:
    src = tmp_path_factory.mktemp("bomb") / "src"
    src.mkdir()
    write_zero_bomb(src / "bomb.zip", [
        ("a.png", b""), ("b.png", b""), ("c.png", b""),
        ("huge-header.png", _png_header(100_000, 100_000)),
        ("small-header.png", _png_header(64, 64)),
    ], ZERO_MIB)
    (src / "good.png").write_bytes((assets_dir / "SOAP_061.png").read_bytes())
    return src


def test_zip_bomb_is_skipped_fast_with_small_rss(tmp_path: Path, bomb: Path) -> None:
    assert (bomb / "bomb.zip").stat().st_size < 12 * MIB
    res = subprocess.run([sys.executable, "-c", CHILD, str(bomb), str(tmp_path / "out"), str(ADDRESS_SPACE_LIMIT)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1",
                              "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.splitlines()[-1])
    doc = got["doc"]
    assert doc["packed"] == 1 and doc["inputs"] == 6
    assert doc["skipped"]["not_image"] == 3
    assert doc["skipped"]["too_large_pixels"] == 1
    assert doc["skipped"]["too_large_file"] == 1
    samples = doc["skipped_samples"]
    assert sorted(s["source"] for s in samples["not_image"]) == ["bomb.zip/a.png", "bomb.zip/b.png", "bomb.zip/c.png"]
    assert "it starts with 00 00 00 00 00 00 00 00" in samples["not_image"][0]["detail"]
    assert samples["too_large_pixels"][0]["detail"] == "100000x100000 = 10000000000 px > 268435456"
    assert "more than a 64x64 image needs" in samples["too_large_file"][0]["detail"]
    assert got["rss_growth_kib"] < 150 * 1024, got["rss_growth_kib"]
    assert got["seconds"] < 5, got["seconds"]


def test_manifest_is_identical_when_a_non_image_is_skipped(tmp_path: Path, assets_dir: Path) -> None:
    """The skip detail of a non-image input held Pillow's ``<_io.BytesIO object at 0x...>``:
    two packs of the same inputs gave different manifests."""
    from data_prep.pack import PackConfig, pack
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.png").write_bytes((assets_dir / "SOAP_061.png").read_bytes())
    (src / "notes.png").write_text("this is not an image\n")
    (src / "fake.gif").write_bytes(b"GIF89a" + b"\xff" * 200)  # a signature Pillow then rejects
    for out in ("a", "b"):
        pack(PackConfig(sources=[str(src)], out=tmp_path / out, workers=1, progress=False))
    a, b = (tmp_path / "a" / "manifest.json").read_bytes(), (tmp_path / "b" / "manifest.json").read_bytes()
    assert a == b
    samples = json.loads(a)["stats"]["skipped_samples"]
    assert b" at 0x" not in a
    assert [s["source"] for s in samples["not_image"]] == ["fake.gif", "notes.png"]
    for sample in samples["not_image"]:
        assert sample["detail"].startswith("no accepted format (JPEG, PNG, TIFF, BMP, WEBP, GIF) recognises")
