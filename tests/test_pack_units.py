"""Unit tests of smae-pack's pieces: image conversion, slicing, pHash, dedup index."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.dedup import NearDuplicateIndex, choose_bands
from data_prep.images import PackOptions, process_image, stretch_to_uint8, tile_boxes
from data_prep.phash import hamming, phash_block

OPTS = PackOptions()


def _crop(assets_dir: Path, name: str, box: tuple[int, int, int, int]) -> Image.Image:
    with Image.open(assets_dir / name) as im:
        return im.convert("RGB").crop(box)


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_jpeg_within_limits_is_passed_through_byte_for_byte(assets_dir: Path) -> None:
    data = _encode(_crop(assets_dir, "2019_YELL_2_541000_4977000_image_crop.jpg", (100, 50, 700, 450)),
                   "JPEG", quality=88)
    out = process_image(data, "crop.jpg", OPTS)
    assert out.reason is None and out.passthrough and not out.sliced
    assert len(out.records) == 1
    rec = out.records[0]
    assert rec.data == data
    assert (rec.width, rec.height, rec.source) == (600, 400, "crop.jpg")


def test_gray_jpeg_is_reencoded_as_rgb(assets_dir: Path) -> None:
    data = _encode(_crop(assets_dir, "SOAP_031.png", (0, 0, 300, 200)).convert("L"), "JPEG", quality=90)
    out = process_image(data, "g.jpg", OPTS)
    assert out.reason is None and not out.passthrough
    assert _decode(out.records[0].data).mode == "RGB"


def test_sixteen_bit_tiff_is_stretched_not_truncated(assets_dir: Path) -> None:
    gray = np.asarray(_crop(assets_dir, "SOAP_061.png", (0, 0, 400, 300)).convert("L"), dtype=np.float64)
    # A 12-bit sensor range with an offset: truncation to 8 bits would clip it to white.
    raw = (gray * 16 + 300).astype(np.uint16)
    tif = _encode(Image.fromarray(raw), "TIFF")
    assert Image.open(io.BytesIO(tif)).mode.startswith("I;16")
    out = process_image(tif, "s.tif", OPTS)
    assert out.reason is None
    dec = np.asarray(_decode(out.records[0].data).convert("L"), dtype=np.float64)
    assert dec.shape == (300, 400)
    lo, hi = np.percentile(dec, [1, 99])
    assert lo < 20 and hi > 235, (lo, hi)
    assert dec.std() > 30
    assert np.corrcoef(dec.ravel(), gray.ravel())[0, 1] > 0.97


def test_stretch_rule_percentiles_and_constant() -> None:
    arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
    arr[0, 0] = 1e9  # one hot pixel must not squash the range
    out = stretch_to_uint8(arr)
    assert out.max() == 255 and out.min() == 0
    assert 100 < int(out[5, 0]) < 155  # the median stays mid-grey
    assert not stretch_to_uint8(np.full((4, 4), 7.0)).any()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1"])
def test_modes_are_converted_to_rgb(assets_dir: Path, mode: str) -> None:
    rgb = _crop(assets_dir, "SOAP_031.png", (0, 0, 256, 192))
    im = rgb.convert(mode)
    if mode == "RGBA":
        alpha = Image.new("L", im.size, 255)
        alpha.paste(0, (0, 0, 64, 64))  # transparent corner: no-data
        im.putalpha(alpha)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = process_image(_encode(im, fmt), f"m.{fmt.lower()}", OPTS)
    assert out.reason is None and not out.passthrough
    dec = _decode(out.records[0].data)
    assert dec.mode == "RGB" and dec.size == (256, 192)
    arr = np.asarray(dec, dtype=np.float64)
    if mode == "RGBA":
        assert arr[:56, :56].max() < 12  # composited over black
        ref = np.asarray(rgb, dtype=np.float64)
        assert np.abs(arr[100:, 100:] - ref[100:, 100:]).mean() < 6
    if mode == "P":
        assert np.abs(arr - np.asarray(rgb, dtype=np.float64)).mean() < 20


def test_palette_with_transparency(assets_dir: Path) -> None:
    im = _crop(assets_dir, "OSBS_029.png", (0, 0, 128, 128)).convert("P")
    im.info["transparency"] = 0
    out = process_image(_encode(im, "PNG", transparency=0), "t.png", OPTS)
    assert out.reason is None and _decode(out.records[0].data).mode == "RGB"


def test_tile_grid_is_near_equal_row_major() -> None:
    boxes = tile_boxes(1249, 1035, 1024)
    assert boxes == [(0, 0, 624, 517), (624, 0, 1249, 517), (0, 517, 624, 1035), (624, 517, 1249, 1035)]
    boxes = tile_boxes(2049, 700, 1024)
    widths = [b[2] - b[0] for b in boxes]
    assert len(boxes) == 3 and max(widths) - min(widths) <= 1 and max(widths) <= 1024
    assert tile_boxes(1024, 1024, 1024) == [(0, 0, 1024, 1024)]


def test_sliced_jpeg_sources_and_sizes(assets_dir: Path) -> None:
    data = (assets_dir / "2019_YELL_2_528000_4978000_image_crop2_1536.jpg").read_bytes()
    out = process_image(data, "big.jpg", OPTS)
    assert out.sliced and not out.passthrough
    assert [r.source for r in out.records] == [
        "big.jpg#0,0,768,768", "big.jpg#768,0,1536,768", "big.jpg#0,768,768,1536", "big.jpg#768,768,1536,1536"]
    assert all(_decode(r.data).size == (768, 768) for r in out.records)


def test_options_refuse_tiles_below_min_side() -> None:
    with pytest.raises(ValueError, match="half of --max-side"):
        PackOptions(min_side=600, max_side=1024)


def test_phash_same_scene_and_reencode_close_distinct_far(assets_dir: Path) -> None:
    png = process_image((assets_dir / "OSBS_029.png").read_bytes(), "a", OPTS).records[0].phash
    tif = process_image((assets_dir / "OSBS_029.tif").read_bytes(), "b", OPTS).records[0].phash
    assert png == tif
    jpg = process_image(_encode(Image.open(assets_dir / "OSBS_029.png").convert("RGB"), "JPEG", quality=80),
                        "c", OPTS).records[0].phash
    assert hamming(png, jpg) <= 4
    other = process_image((assets_dir / "SOAP_031.png").read_bytes(), "d", OPTS).records[0].phash
    assert hamming(png, other) > 12
    block = np.random.default_rng(0).random((32, 32))
    assert phash_block(block) == phash_block(block * 3 + 10)  # invariant to gain and offset


def _brute_force(hashes: list[int], d: int) -> list[bool]:
    kept: list[int] = []
    flags = []
    for h in hashes:
        new = all((h ^ k).bit_count() > d for k in kept)
        flags.append(new)
        if new:
            kept.append(h)
    return flags


@pytest.mark.parametrize("d", [0, 1, 3, 4, 8])
@pytest.mark.parametrize("expected", [10, 10 ** 7])
def test_band_index_equals_brute_force(d: int, expected: int) -> None:
    rng = random.Random(d * 31 + expected)
    base = [rng.getrandbits(64) for _ in range(300)]
    hashes = list(base)
    for _ in range(500):  # planted near-duplicates at distances 0..d+2
        h = rng.choice(base)
        for bit in rng.sample(range(64), rng.randint(0, d + 2)):
            h ^= 1 << bit
        hashes.append(h)
    rng.shuffle(hashes)
    index = NearDuplicateIndex(d, expected=expected)
    assert [index.offer(h) for h in hashes] == _brute_force(hashes, d)


def test_dedup_off_and_band_choice() -> None:
    off = NearDuplicateIndex(-1)
    assert off.offer(5) and off.offer(5)
    assert choose_bands(4, 13_000_000) == 3  # 21-bit bands, radius 1 (see dedup.py)
    assert choose_bands(4, 1000) == 5  # small sets: exact bands are cheapest


def test_bounded_read_keeps_legitimate_files_whose_header_lies_beyond_64_kib(assets_dir: Path) -> None:
    """A JPEG with 200 KB of ICC profile before its frame header, and a TIFF whose directory
    is written after the pixels (libtiff), are read whole; the header search grows past 64 KiB."""
    from data_prep.images import HEAD_BYTES, header_size
    from data_prep.sources import read_capped
    crop = _crop(assets_dir, "SOAP_061.png", (0, 0, 400, 400))
    icc = random.Random(0).randbytes(200_000)
    jpeg = _encode(crop, "JPEG", quality=90, icc_profile=icc)
    tiff = _encode(crop, "TIFF", compression="tiff_lzw")
    for data in (jpeg, tiff):
        assert len(data) > HEAD_BYTES and header_size(data[:HEAD_BYTES]) is None
        assert read_capped(io.BytesIO(data), OPTS.max_pixels) == data
    assert process_image(jpeg, "icc.jpg", OPTS).passthrough


def test_bounded_read_refuses_without_reading_the_rest() -> None:
    from data_prep.sources import InputReadError, read_capped

    class Counting(io.BytesIO):
        consumed = 0

        def read(self, n: int | None = -1) -> bytes:
            data = super().read(n)
            self.consumed += len(data)
            return data

    junk = Counting(b"\0" * (10 << 20))
    with pytest.raises(InputReadError) as e:
        read_capped(junk, OPTS.max_pixels)
    assert e.value.reason == "not_image" and junk.consumed == 64 * 1024
    jpeg_sig = Counting(b"\xff\xd8\xff" + bytes(40 << 20))  # a JPEG signature and no header
    with pytest.raises(InputReadError) as e:
        read_capped(jpeg_sig, OPTS.max_pixels)
    assert e.value.reason == "corrupt" and jpeg_sig.consumed == 16 << 20


def test_worker_counts_an_undocumented_decoder_failure_but_not_memory_exhaustion(monkeypatch, assets_dir) -> None:
    """A decoder raising something undocumented is counted as corrupt (named in the detail);
    MemoryError is the machine's problem, not the image's: it propagates instead of dropping
    a good image from the dataset."""
    from data_prep import worker
    from data_prep.sources import InputItem

    src = next(p for p in sorted(assets_dir.iterdir()) if p.suffix.lower() in (".jpg", ".png"))
    item = InputItem(source=src.name, kind="file", path=str(src), member="", size=src.stat().st_size,
                     mtime_ns=src.stat().st_mtime_ns)
    state = worker._State(options=PackOptions(), work=None, zips=None)

    def boom(exc: BaseException):
        def raise_it(*_args, **_kwargs):
            raise exc
        return raise_it

    monkeypatch.setattr(worker, "read_item", lambda *_args: b"bytes")
    monkeypatch.setattr(worker, "process_image", boom(RuntimeError("decoder state")))
    out = worker._outcome(item, None, state)
    assert out.reason == "corrupt" and out.detail == "unexpected RuntimeError: decoder state"
    monkeypatch.setattr(worker, "process_image", boom(MemoryError()))
    with pytest.raises(MemoryError):
        worker._outcome(item, None, state)
