"""Build small packed datasets from the bundled real images, for tests and benchmarks.

Until ``smae-pack`` lands this is the one way tests get a schema-1 dataset: random
crops (96-200 px a side by default) of the NEON aerial images in ``assets/neon``,
JPEG-encoded with Pillow and written with :class:`ShardWriter` + :func:`write_manifest`.
Everything is seeded, so two builds with the same arguments hold the same bytes.

Helpers to damage a dataset on purpose (for the bad-record tests) live here too.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from selectivemae_ds.data.shards import ShardedDataset, ShardWriter, shard_name, write_manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def source_images(assets_dir: str | Path) -> list[Path]:
    """The decodable RGB images among the bundled assets, in a fixed (sorted) order."""
    paths = sorted(p for p in Path(assets_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{assets_dir}: no images to cut crops from")
    return paths


def build_dataset(out_dir: str | Path, assets_dir: str | Path, *, count: int = 48, shards: int = 3,
                  min_side: int = 96, max_side: int = 200, quality: int = 90, seed: int = 0,
                  junk: tuple[int, ...] = ()) -> Path:
    """Write ``count`` real JPEG crops into ``shards`` shards under ``out_dir``.

    Crop k comes from image ``k % len(images)`` with a random box of height and width
    drawn independently in [min_side, max_side], both capped by the image's size (so
    aspect ratios vary, which exercises RandomResizedCrop's fallback path). Records listed in ``junk`` are written as bytes
    that are not an image but carry a valid crc32: they pass the reader's checksum and
    must be caught by the pipeline's own header check.

    Returns ``out_dir``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    images = [Image.open(p).convert("RGB") for p in source_images(assets_dir)]
    per_shard = -(-count // shards)
    infos = []
    k = 0
    for s in range(shards):
        writer = ShardWriter(out, shard_name(s))
        for _ in range(min(per_shard, count - k)):
            img = images[k % len(images)]
            # Both bounds are capped by the image, so small sources give their full size.
            h = int(rng.integers(min(min_side, img.height), min(max_side, img.height) + 1))
            w = int(rng.integers(min(min_side, img.width), min(max_side, img.width) + 1))
            y = int(rng.integers(0, img.height - h + 1))
            x = int(rng.integers(0, img.width - w + 1))
            if k in junk:
                data = b"this record is not an image " + bytes(int(v) for v in rng.integers(0, 256, 200))
            else:
                buf = io.BytesIO()
                img.crop((x, y, x + w, y + h)).save(buf, format="JPEG", quality=quality)
                data = buf.getvalue()
            writer.add(data, h, w, phash=k, source=f"crop{k:04d}:{y},{x},{h},{w}")
            k += 1
        infos.append(writer.finalize())
    write_manifest(out, infos, params={"builder": "tests.shard_fixtures", "seed": seed, "quality": quality},
                   stats={"records": count})
    return out


def corrupt_record(root: str | Path, index: int, nbytes: int = 16) -> None:
    """Flip ``nbytes`` bytes in the middle of record ``index``'s heap slice in place.

    The index arrays (and so the manifest digest) are left alone: the dataset still
    opens, and reading the record raises ``RecordCorruptError`` (crc32 mismatch).
    """
    ds = ShardedDataset(root)
    s, j = ds.locate(index)
    sh = ds.shard(s)
    a, b = int(sh.offsets[j]), int(sh.offsets[j + 1])
    mid = a + (b - a) // 2
    lo, hi = mid, min(b, mid + nbytes)
    heap = zarr.open_array(str(Path(root) / sh.name / "bytes"), mode="r+")
    heap[lo:hi] = np.bitwise_xor(np.asarray(heap[lo:hi]), 0xFF)
