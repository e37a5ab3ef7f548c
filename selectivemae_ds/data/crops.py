"""Small packed datasets of seeded random crops of real images, for benchmarks and tests.

:func:`build_crop_dataset` cuts ``count`` crops (96-200 px a side by default) out of the
images in a directory (the repository's bundled NEON aerial scenes in ``assets/neon``
for ``bench/*.py`` and the tests), JPEG-encodes them with Pillow and writes a schema-1
dataset with :class:`ShardWriter` + :func:`write_manifest`, without ``smae-pack``'s
conversion, dedup or resumability. Everything is seeded: two builds with the same
arguments hold the same bytes, so every machine benchmarks the same records.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from selectivemae_ds.data.shards import ShardWriter, shard_name, write_manifest
from selectivemae_ds.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def source_images(images_dir: str | Path) -> list[Path]:
    """The images in ``images_dir`` (by suffix), in a fixed (sorted) order; DataError when none."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory of source images")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) to cut crops from")
    return paths


def build_crop_dataset(out_dir: str | Path, images_dir: str | Path, *, count: int = 48, shards: int = 3,
                       min_side: int = 96, max_side: int = 200, quality: int = 90, seed: int = 0,
                       junk: tuple[int, ...] = ()) -> Path:
    """Write ``count`` JPEG crops of the images in ``images_dir`` into ``shards`` shards under ``out_dir``.

    Crop k comes from image ``k % len(images)`` with a random box of height and width
    drawn independently in [min_side, max_side], both capped by the image's size (so
    aspect ratios vary, which exercises RandomResizedCrop's fallback path). Records listed
    in ``junk`` are written as bytes that are not an image but carry a valid crc32: they
    pass the reader's checksum and must be caught by the pipeline's own header check.

    Returns ``out_dir``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    images = [Image.open(p).convert("RGB") for p in source_images(images_dir)]
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
    write_manifest(out, infos, params={"builder": __name__, "seed": seed, "quality": quality},
                   stats={"records": count})
    return out
