"""Datasets for tests: the seeded crop datasets of the bundled images, and damage done on purpose.

``build_dataset`` and ``source_images`` are :mod:`selectivemae_ds.data.crops` (where the
benchmarks get them too); the helpers that damage a dataset (for the bad-record tests)
live here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from selectivemae_ds.data.crops import build_crop_dataset as build_dataset
from selectivemae_ds.data.crops import source_images
from selectivemae_ds.data.shards import ShardedDataset

__all__ = ["build_dataset", "corrupt_record", "source_images"]


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
