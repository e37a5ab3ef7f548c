"""``smae-pack verify DIR``: check a packed dataset, shard by shard, record by record.

Checks, in order, each failure reported with the shard (and record where one is at
fault) and counted; the run goes on to the next shard so one report lists everything:

1. ``manifest.json``: format, schema version, shard list, total count;
2. per shard: it exists, Zarr group schema, index arrays of the manifest's length,
   offsets (start at 0, strictly increasing, end at the heap size: the first record that
   breaks this is named), index digest against the manifest, ``source`` length;
3. per record: crc32 of its bytes, that it decodes as a JPEG and that the decoded size
   equals the stored height/width.

Decoding runs at 1/8 scale (libjpeg DCT scaling): every entropy-coded scan is still
parsed, so truncation and damaged Huffman data fail exactly as in a full decode, while
the inverse DCT runs on 1/64 of the pixels. Byte flips that still decode are caught by
the crc32.
"""
from __future__ import annotations

import io
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from PIL import Image

from selectivemae_ds.data.shards import (
    INDEX_ARRAYS, SCHEMA_VERSION, ShardFormatError, index_digest, read_manifest,
)

MAX_LISTED = 50
READ_WINDOW = 64 * 1024 * 1024


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_dataset`."""

    records: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _first_bad_offset(off: np.ndarray, heap_size: int) -> str | None:
    if off.size == 0:
        return "offsets array is empty"
    if off[0] != 0:
        return f"record 0: offsets start at {int(off[0])}, not 0"
    bad = np.flatnonzero(np.diff(off) <= 0)
    if bad.size:
        i = int(bad[0])
        return f"record {i}: offsets [{int(off[i])}, {int(off[i + 1])}) are not increasing"
    beyond = np.flatnonzero(off > heap_size)
    if beyond.size:
        i = max(int(beyond[0]) - 1, 0)
        return f"record {i}: offset {int(off[i + 1])} lies beyond the heap ({heap_size} bytes)"
    if off[-1] != heap_size:
        return f"offsets end at {int(off[-1])} but the heap holds {heap_size} bytes"
    return None


def _records(heap: Any, off: np.ndarray) -> Iterator[tuple[int, bytes]]:
    """(local index, bytes) of every record, reading the heap in ~64 MiB windows so a
    multi-GB shard is neither read record by record (slow) nor all at once (memory)."""
    n = off.size - 1
    j = 0
    while j < n:
        k = max(j + 1, int(np.searchsorted(off, off[j] + READ_WINDOW, side="right")) - 1)
        k = min(k, n)
        base = int(off[j])
        block = heap[base:int(off[k])].tobytes()
        for jj in range(j, k):
            yield jj, block[int(off[jj]) - base:int(off[jj + 1]) - base]
        j = k


def _verify_shard(root: Path, entry: dict[str, Any], first: int, res: VerifyResult) -> None:
    name = entry["name"]
    path = root / name
    n = entry["count"]

    def problem(msg: str) -> None:
        res.problems.append(f"{name}: {msg}")

    if not path.is_dir():
        problem("listed in the manifest but missing")
        return
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        arrays = {k: np.asarray(group[k][:]) for k in INDEX_ARRAYS}
        heap = group["bytes"]
        sources = np.asarray(group["source"][:], dtype=object)
    except (KeyError, FileNotFoundError, ValueError, TypeError, OSError) as e:
        problem(f"unreadable shard ({type(e).__name__}: {e})")
        return
    if attrs.get("schema") != SCHEMA_VERSION:
        problem(f"unknown schema {attrs.get('schema')!r} (this version reads {SCHEMA_VERSION})")
        return
    off = arrays["offsets"]
    if off.shape != (n + 1,) or any(arrays[k].shape != (n,) for k in INDEX_ARRAYS[1:]) or sources.shape != (n,):
        problem(f"index arrays do not hold the manifest's {n} records")
        return
    heap_size = int(heap.shape[0])
    if heap_size != entry["bytes"]:
        problem(f"heap holds {heap_size} bytes, manifest says {entry['bytes']}")
    bad_offsets = _first_bad_offset(off, heap_size)
    if bad_offsets is not None:
        # Name the global record too: that is what a training log would print.
        match = re.match(r"record (\d+)(.*)", bad_offsets)
        if match:
            local = int(match.group(1))
            bad_offsets = f"record {first + local} (local {local}){match.group(2)}"
        problem(f"inconsistent offsets: {bad_offsets}")
    if index_digest(arrays) != entry["index_sha256"]:
        problem("index digest does not match the manifest (offsets, sizes, hashes or crc32 altered)")
    if bad_offsets is not None:
        return  # record boundaries are unknown: checking records would only add noise
    for j, data in _records(heap, off):
        rec = first + j
        if zlib.crc32(data) != int(arrays["crc32"][j]):
            problem(f"record {rec} (local {j}, source {sources[j]!s}) fails its crc32 check")
            continue
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
                size = im.size
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            problem(f"record {rec} (local {j}, source {sources[j]!s}) does not decode: {type(e).__name__}: {e}")
            continue
        if size != (int(arrays["width"][j]), int(arrays["height"][j])):
            problem(f"record {rec} (local {j}) decodes to {size[0]}x{size[1]}, index says "
                    f"{int(arrays['width'][j])}x{int(arrays['height'][j])}")
    res.records += n


def verify_dataset(root: str | os.PathLike[str]) -> VerifyResult:
    """Check ``root`` completely; never raises for a damaged dataset."""
    root = Path(root)
    res = VerifyResult()
    try:
        manifest = read_manifest(root)
    except ShardFormatError as e:
        res.problems.append(str(e))
        return res
    first = 0
    listed = set()
    for entry in manifest["shards"]:
        listed.add(entry["name"])
        _verify_shard(root, entry, first, res)
        first += entry["count"]
        res.shards += 1
    strays = sorted(p.name for p in root.glob("shard-*.zarr") if p.name not in listed)
    if strays:
        res.notes.append(f"shard directories not in the manifest (ignored by readers): {strays[:5]}")
    return res


def format_result(root: str | os.PathLike[str], res: VerifyResult) -> str:
    if res.ok:
        lines = [f"verify {root}: OK, {res.records} records in {res.shards} shard(s) "
                 "(manifest, schema, offsets, digests, crc32, JPEG decode)"]
    else:
        lines = [f"verify {root}: FAILED, {len(res.problems)} problem(s)"]
        lines += [f"  {p}" for p in res.problems[:MAX_LISTED]]
        if len(res.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(res.problems) - MAX_LISTED} more")
    lines += [f"  note: {n}" for n in res.notes]
    return "\n".join(lines)
