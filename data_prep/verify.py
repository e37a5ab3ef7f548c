"""``smae-pack verify DIR``: check a packed dataset, shard by shard, record by record.

Checks, in order, each failure reported with the shard (and record where one is at
fault) and counted; the run goes on to the next shard so one report lists everything:

1. ``manifest.json``: format, schema version, shard list, total count; a manifest that
   lists no records fails (an empty dataset is not a usable one);
2. per shard, by :func:`selectivemae_ds.data.shards.check_shard` (the reader's own check):
   it exists, Zarr group schema, index arrays of the manifest's length, index digest
   against the manifest, heap size, offsets (start at 0, strictly increasing, end at the
   heap size: the first record that breaks this is named), exclusions inside the shard
   (a merged multi-node dataset); then the ``source`` length;
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
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from selectivemae_ds.data.shards import (
    CRC_MISMATCH, Root, ShardFormatError, ShardProblem, check_shard, open_root, read_manifest, stored_count,
)
from selectivemae_ds.data.store import RemoteStore

MAX_LISTED = 50
READ_WINDOW = 64 * 1024 * 1024


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_dataset`: ``problems`` as lines naming shard and record."""

    records: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _records(read: Callable[[int, int], bytes], off: np.ndarray) -> Iterator[tuple[int, bytes]]:
    """(local index, bytes) of every record, reading the heap in ~64 MiB windows so a
    multi-GB shard is neither read record by record (slow) nor all at once (memory)."""
    n = off.size - 1
    j = 0
    while j < n:
        k = max(j + 1, int(np.searchsorted(off, off[j] + READ_WINDOW, side="right")) - 1)
        k = min(k, n)
        base = int(off[j])
        block = read(base, int(off[k]))
        for jj in range(j, k):
            yield jj, block[int(off[jj]) - base:int(off[jj + 1]) - base]
        j = k


def _record_problems(name: str, arrays: dict[str, np.ndarray], read: Callable[[int, int], bytes],
                     sources: np.ndarray, exclude: frozenset[int]) -> Iterator[ShardProblem]:
    """crc32, JPEG decode and decoded size of every record of a shard whose index is sound
    (records the manifest excludes are never read by a reader and are not checked)."""
    for j, data in _records(read, arrays["offsets"]):
        if j in exclude:
            continue
        src = str(sources[j])
        if zlib.crc32(data) != int(arrays["crc32"][j]):
            yield ShardProblem(name, CRC_MISMATCH, j, src)
            continue
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
                size = im.size
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            yield ShardProblem(name, f"does not decode: {type(e).__name__}: {e}", j, src)
            continue
        stored = (int(arrays["width"][j]), int(arrays["height"][j]))
        if size != stored:
            yield ShardProblem(name, f"decodes to {size[0]}x{size[1]}, the index says {stored[0]}x{stored[1]}", j, src)


def _verify_shard(root: Root, entry: dict[str, Any], first: int, res: VerifyResult) -> None:
    index, problems = check_shard(root, entry)
    exclude = entry.get("exclude", [])
    res.problems += [p.describe(first, exclude=exclude) for p in problems]
    if index is None:
        return  # record boundaries are unknown: checking records would only add noise
    try:
        sources = np.asarray(index.group["source"][:], dtype=object)
    except (KeyError, FileNotFoundError, ValueError, TypeError, OSError) as e:
        res.problems.append(ShardProblem(entry["name"], f"unreadable source array ({type(e).__name__}: {e})")
                            .describe())
        return
    stored = stored_count(entry)
    if sources.shape != (stored,):
        res.problems.append(ShardProblem(entry["name"], f"source array does not hold the manifest's "
                                                        f"{stored} records").describe())
        return
    res.problems += [p.describe(first, exclude=exclude)
                     for p in _record_problems(entry["name"], index.arrays, index.read, sources, frozenset(exclude))]
    res.records += entry["count"]


def verify_dataset(root: str | os.PathLike[str]) -> VerifyResult:
    """Check ``root`` (a directory or an object store URL) completely; never raises for a damaged
    dataset (a store that cannot be reached raises its DataError)."""
    root = open_root(root)
    res = VerifyResult()
    try:
        manifest = read_manifest(root)
    except ShardFormatError as e:
        res.problems.append(str(e))
        return res
    if not manifest["shards"]:
        res.problems.append(f"{root}: the manifest lists no records (an empty dataset: every input was "
                            "skipped or none was found); nothing can train on it")
        return res
    first = 0
    listed = set()
    for entry in manifest["shards"]:
        listed.add(entry["name"])
        _verify_shard(root, entry, first, res)
        first += entry["count"]
        res.shards += 1
    if isinstance(root, RemoteStore):
        return res  # objects outside the manifest are not listed: a bucket prefix may be huge
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
