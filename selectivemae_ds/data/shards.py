"""The dataset format: Zarr v3 shards of encoded JPEG plus a manifest (schema 1).

Layout of a packed dataset directory::

    DATASET/
      manifest.json            schema, shard list, packing params, stats (the commit point)
      shard-00000.zarr/        Zarr v3 group, written by one writer, finalized by atomic rename
        bytes    uint8  [total]  encoded JPEG heap, no compressor, Zarr sharding codec
        offsets  int64  [n+1]    record i = bytes[offsets[i]:offsets[i+1]]
        height   uint16 [n]
        width    uint16 [n]
        phash    uint64 [n]      64-bit perceptual hash used for dedup
        crc32    uint32 [n]      zlib.crc32 of each record's bytes
        source   string [n]      origin: archive member / relative path [+ slice box]

``crc32`` is an addition to the design card's schema: JPEG decoders tolerate many
flipped bytes, so "every record decodes" alone cannot find a rotten heap.

Readers never trust the files: the schema version must be known, the index digest
(sha256 over offsets, height, width, phash, crc32) must match the manifest, offsets
must start at 0, be increasing and end at the heap's length. :func:`check_shard` is the
one place these rules are checked: it returns structured :class:`ShardProblem` values
(shard, record, reason); the reader raises the first as a :class:`ShardFormatError`
naming the shard, ``smae-pack verify`` lists them all.

A shard directory that is not listed in ``manifest.json`` does not exist for readers;
writers build a shard under a temporary name and rename it into place once complete,
so a half-written shard is never visible.

Exclusions (multi-node packing, ``smae-pack merge``): a manifest entry may carry
``"exclude"``, the sorted local indices of records stored in the shard that readers must
skip (near-duplicates found only when the parts were merged). The entry's ``count`` is the
number of records readers see; the shard's arrays hold ``count + len(exclude)`` records
and its digest covers all of them. Record ``i`` of the dataset is the ``i``-th record not
excluded, so global indices stay dense. A shard's ``name`` may be a relative path
(``part-00001-of-00003/shard-00000.zarr``) of plain components.

Object storage: a dataset root may be a URL (``s3://bucket/prefix``, see
:mod:`selectivemae_ds.data.store`). The manifest and every shard's small objects (Zarr
metadata, index arrays, sources) are fetched whole and opened as an in-memory Zarr group, so
:func:`check_shard` applies exactly the same rules; heap records are ranged GETs through the
same checked sharding index (:class:`_RemoteHeap`), optionally through a bounded local cache.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import google_crc32c
import numpy as np
import zarr
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from selectivemae_ds.atomic import atomic_write_text, fsync_dir
from selectivemae_ds.data.store import ObjectMissing, RemoteOptions, RemoteStore, is_remote, join
from selectivemae_ds.errors import DataError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "selectivemae-ds-shards"

# The heap is stored with Zarr's sharding codec so one dataset shard is a handful of
# files rather than thousands of chunk files. A record read touches the inner chunks
# that cover it: 256 KiB inner chunks keep read amplification near 2x for typical
# 100-300 KB remote-sensing JPEGs, while 256 MiB outer shards keep the file count low.
HEAP_CHUNK_BYTES = 256 * 1024
HEAP_SHARD_BYTES = 256 * 1024 * 1024

INDEX_ARRAYS = ("offsets", "height", "width", "phash", "crc32")
MAX_SIDE_STORABLE = np.iinfo(np.uint16).max


class ShardFormatError(DataError):
    """A dataset directory, manifest or shard violates schema 1 (a data error, exit code 3)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.zarr"


def index_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the numeric index arrays, in a fixed order and byte order."""
    h = hashlib.sha256()
    for key in INDEX_ARRAYS:
        arr = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    """Records readers see (stored records minus ``exclude``)."""
    bytes: int
    index_sha256: str
    exclude: tuple[int, ...] = ()
    """Sorted local indices of stored records that readers skip."""

    @property
    def stored(self) -> int:
        return self.count + len(self.exclude)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "count": self.count, "bytes": self.bytes,
                               "index_sha256": self.index_sha256}
        if self.exclude:
            doc["exclude"] = list(self.exclude)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ShardInfo":
        return cls(doc["name"], doc["count"], doc["bytes"], doc["index_sha256"], tuple(doc.get("exclude", ())))


def stored_count(entry: dict[str, Any]) -> int:
    """Records held by the shard of a manifest entry (visible plus excluded)."""
    return int(entry["count"]) + len(entry.get("exclude", ()))


def _safe_relative_name(name: Any) -> bool:
    parts = name.split("/") if isinstance(name, str) else []
    return bool(parts) and all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def _exclude_ok(exclude: Any) -> bool:
    return (isinstance(exclude, list) and all(isinstance(x, int) and x >= 0 for x in exclude)
            and all(a < b for a, b in zip(exclude, exclude[1:])))


class ShardWriter:
    """Builds one shard. Records are spooled to a temporary file; :meth:`finalize`
    writes the Zarr group under a temporary name, fsyncs it and renames it into place.

    Nothing is visible at ``out_dir/name`` until :meth:`finalize` returns.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str):
        self.out_dir = Path(out_dir)
        self.name = name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._spool = tempfile.NamedTemporaryFile(
            prefix=f".{name}.", suffix=".spool", dir=self.out_dir, delete=False
        )
        self._offsets = [0]
        self._height: list[int] = []
        self._width: list[int] = []
        self._phash: list[int] = []
        self._crc: list[int] = []
        self._source: list[str] = []
        self._closed = False

    def __len__(self) -> int:
        return len(self._height)

    def add(self, data: bytes, height: int, width: int, phash: int, source: str) -> None:
        if self._closed:
            raise RuntimeError(f"shard {self.name} is already finalized")
        if not data:
            raise ValueError(f"{source}: empty record")
        if not (0 < height <= MAX_SIDE_STORABLE and 0 < width <= MAX_SIDE_STORABLE):
            raise ValueError(f"{source}: size {height}x{width} does not fit uint16")
        self._spool.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        self._height.append(height)
        self._width.append(width)
        self._phash.append(phash & 0xFFFFFFFFFFFFFFFF)
        self._crc.append(zlib.crc32(data))
        self._source.append(source)

    def abort(self) -> None:
        if not self._closed:
            self._spool.close()
            self._closed = True
        Path(self._spool.name).unlink(missing_ok=True)

    def finalize(self) -> ShardInfo:
        if self._closed:
            raise RuntimeError(f"shard {self.name} is already finalized")
        n = len(self)
        if n == 0:
            self.abort()
            raise ValueError(f"shard {self.name} has no records")
        self._spool.flush()
        self._spool.close()
        self._closed = True
        spool_path = Path(self._spool.name)
        final = self.out_dir / self.name
        if final.exists():
            spool_path.unlink(missing_ok=True)
            raise FileExistsError(f"{final} already exists")
        # Not mkdtemp: its 0700 would survive the rename and lock other users out of the
        # dataset. A leftover of this name is an interrupted writer's, removed on resume.
        tmp = self.out_dir / f".{self.name}.{os.getpid()}.partial"
        try:
            tmp.mkdir()
            arrays = {
                "offsets": np.asarray(self._offsets, dtype=np.int64),
                "height": np.asarray(self._height, dtype=np.uint16),
                "width": np.asarray(self._width, dtype=np.uint16),
                "phash": np.asarray(self._phash, dtype=np.uint64),
                "crc32": np.asarray(self._crc, dtype=np.uint32),
            }
            total = int(arrays["offsets"][-1])
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            group.attrs.update({"format": FORMAT_NAME, "schema": SCHEMA_VERSION, "count": n})
            outer = min(HEAP_SHARD_BYTES, -(-total // HEAP_CHUNK_BYTES) * HEAP_CHUNK_BYTES)
            heap = group.create_array(
                "bytes", shape=(total,), dtype="uint8", chunks=(HEAP_CHUNK_BYTES,),
                shards=(outer,), compressors=None, fill_value=0,
            )
            # One assignment per outer shard: each Zarr shard file is written once.
            with open(spool_path, "rb") as f:
                for start in range(0, total, outer):
                    block = np.frombuffer(f.read(min(outer, total - start)), dtype=np.uint8)
                    heap[start:start + block.size] = block
            for key, arr in arrays.items():
                group.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape, compressors=None)[:] = arr
            src = group.create_array("source", shape=(n,), dtype=str, chunks=(n,), compressors=None)
            src[:] = np.asarray(self._source, dtype=object)
            for root, _dirs, files in os.walk(tmp):
                for fn in files:
                    fd = os.open(os.path.join(root, fn), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            os.rename(tmp, final)
            fsync_dir(self.out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            spool_path.unlink(missing_ok=True)
        return ShardInfo(self.name, n, total, index_digest(arrays))


def write_manifest(out_dir: str | os.PathLike, shards: list[ShardInfo], params: dict[str, Any],
                   stats: dict[str, Any]) -> Path:
    """Write manifest.json atomically and durably (:func:`selectivemae_ds.atomic.atomic_write_text`).

    The text is canonical (sorted keys, fixed indentation), so the same shards, params and
    stats always give byte-identical manifests.
    """
    doc = {
        "format": FORMAT_NAME,
        "schema": SCHEMA_VERSION,
        "count": sum(s.count for s in shards),
        "shards": [s.to_json() for s in shards],
        "params": params,
        "stats": stats,
    }
    return atomic_write_text(Path(out_dir) / MANIFEST_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n")


Root = Path | RemoteStore
"""A dataset root: a local directory or an object store prefix."""


def open_root(root: str | os.PathLike | RemoteStore, remote: RemoteOptions | None = None) -> Root:
    """``s3://...`` (any URL :func:`store.is_remote` accepts) -> a :class:`RemoteStore` read with
    ``remote`` options; anything else -> a local Path."""
    if isinstance(root, RemoteStore):
        return root
    return RemoteStore(os.fspath(root), remote) if is_remote(root) else Path(root)


def read_manifest(root: str | os.PathLike | RemoteStore) -> dict[str, Any]:
    """Load and validate manifest.json (plain JSON: no pickle, no eval)."""
    root = open_root(root)
    if isinstance(root, RemoteStore):
        path: Any = join(root.url, MANIFEST_NAME)
        try:
            raw = root.get(MANIFEST_NAME)
        except ObjectMissing as e:
            raise ShardFormatError(f"{root}: no {MANIFEST_NAME}; is this a dataset written by smae-pack?") from e
    else:
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise ShardFormatError(f"{root}: no {MANIFEST_NAME}; is this a directory written by smae-pack?")
        raw = path.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: not a {FORMAT_NAME} manifest")
    if doc.get("schema") != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{path}: unknown schema {doc.get('schema')!r}; this version reads schema {SCHEMA_VERSION}")
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise ShardFormatError(f"{path}: 'shards' must be a list")
    for i, s in enumerate(shards):
        ok = (isinstance(s, dict) and _safe_relative_name(s.get("name")) and isinstance(s.get("count"), int)
              and isinstance(s.get("bytes"), int) and isinstance(s.get("index_sha256"), str)
              and _exclude_ok(s.get("exclude", [])) and s["count"] >= 0 and stored_count(s) > 0
              and s["bytes"] >= 0)
        if not ok:
            raise ShardFormatError(f"{path}: shard entry {i} is malformed: {s!r}")
    if doc.get("count") != sum(s["count"] for s in shards):
        raise ShardFormatError(f"{path}: 'count' does not equal the sum of shard counts")
    return doc


class _DirectHeap:
    """Reads byte ranges of a shard's heap straight from its Zarr shard files.

    zarr-python costs ~1 ms per read call (async machinery, whole inner chunks); the
    loader reads one small range per sample, so that overhead dominated CPU time. The
    heap's layout is fixed by schema 1 (uint8, raw inner chunks, sharding index at the
    end of each shard file, protected by crc32c), so a range can be served by one
    ``pread`` per inner chunk it touches, after checking the index checksum and bounds.
    Any metadata that differs from what this writer produces disables the fast path
    (:meth:`open` returns None) and reads go through zarr.
    """

    EXPECTED_CODEC = {
        "name": "sharding_indexed",
        "configuration": {
            "codecs": [{"name": "bytes"}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end",
        },
    }

    def __init__(self, array_dir: Path, where: str, total: int, outer: int, inner: int):
        self.array_dir, self.where, self.total, self.outer, self.inner = array_dir, where, total, outer, inner
        self.per_shard = outer // inner
        self._index: dict[int, tuple[int, np.ndarray]] = {}  # outer shard -> (fd or -1, (per_shard, 2) uint64)

    @classmethod
    def open(cls, array_dir: Path, where: str, total: int) -> "_DirectHeap | None":
        layout = cls.layout(json.loads((array_dir / "zarr.json").read_text(encoding="utf-8")), total)
        return None if layout is None else cls(array_dir, where, total, *layout)

    @classmethod
    def layout(cls, meta: Any, total: int) -> tuple[int, int] | None:
        """(outer, inner) chunk sizes of a heap array whose metadata ``meta`` (zarr.json) is
        exactly what this writer produces; None otherwise."""
        try:
            codecs = meta["codecs"]
            outer = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
            inner = int(codecs[0]["configuration"]["chunk_shape"][0])
            cfg = {k: v for k, v in codecs[0]["configuration"].items() if k != "chunk_shape"}
            key_enc = meta["chunk_key_encoding"]
            usable = (meta["data_type"] == "uint8" and meta["shape"] == [total] and len(codecs) == 1
                      and {"name": codecs[0]["name"], "configuration": cfg} == cls.EXPECTED_CODEC
                      and key_enc.get("name") == "default"
                      and key_enc.get("configuration", {}).get("separator", "/") == "/"
                      and inner > 0 and outer % inner == 0 and int(meta.get("fill_value", 0)) == 0)
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        return (outer, inner) if usable else None

    def check_index(self, k: int, tail: bytes, size: int) -> np.ndarray:
        """The chunk index of heap file ``c/k`` (``size`` bytes) from its last ``per_shard * 16 + 4``
        bytes ``tail``, after its crc32c and the bounds of every present chunk are checked."""
        index_bytes = self.per_shard * 16
        if len(tail) != index_bytes + 4 or google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
            raise ShardFormatError(f"{self.where}: heap file c/{k} has a damaged chunk index")
        index = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.per_shard, 2)
        present = index[:, 0] != np.iinfo(np.uint64).max
        if np.any(index[present, 1] != self.inner) or np.any(
                index[present, 0] + index[present, 1] > size - index_bytes - 4):
            raise ShardFormatError(f"{self.where}: heap file c/{k} has chunk entries outside the file")
        return index

    def _shard_index(self, k: int) -> tuple[int, np.ndarray]:
        got = self._index.get(k)
        if got is not None:
            return got
        path = self.array_dir / "c" / str(k)
        index_bytes = self.per_shard * 16
        if not path.exists():  # zarr does not write a shard whose chunks are all fill value
            got = (-1, np.full((self.per_shard, 2), np.iinfo(np.uint64).max, dtype=np.uint64))
        else:
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            tail = os.pread(fd, index_bytes + 4, size - index_bytes - 4) if size >= index_bytes + 4 else b""
            try:
                index = self.check_index(k, tail, size)
            except ShardFormatError:
                os.close(fd)
                raise
            got = (fd, index)
        self._index[k] = got
        return got

    def _pieces(self, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        """(heap file ``c/k``, offset in it, length) for heap bytes [a, b), one per inner chunk
        touched; ``k`` is -1 for a chunk that is fill value (absent file or index entry)."""
        pos = a
        while pos < b:
            chunk = pos // self.inner
            k, j = divmod(chunk, self.per_shard)
            start_in_chunk = pos - chunk * self.inner
            n = min(b - pos, self.inner - start_in_chunk)
            present, index = self._shard_index(k)
            offset = int(index[j, 0])
            if present < 0 or offset == np.iinfo(np.uint64).max:
                yield -1, 0, n
            else:
                yield k, offset + start_in_chunk, n
            pos += n

    def read(self, a: int, b: int) -> bytes:
        """Heap bytes [a, b)."""
        parts = []
        for k, offset, n in self._pieces(a, b):
            if k < 0:
                parts.append(bytes(n))
                continue
            data = os.pread(self._index[k][0], n, offset)
            if len(data) != n:
                raise ShardFormatError(f"{self.where}: heap file c/{k} is truncated")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        for fd, _index in self._index.values():
            if fd >= 0:
                os.close(fd)
        self._index.clear()


class _RemoteHeap(_DirectHeap):
    """:class:`_DirectHeap` on an object store: the same layout rules and index checks, the
    bytes fetched by ranged GETs (one request per record: the inner chunks a record spans are
    adjacent in the heap file and their ranges are coalesced). ``files`` maps each heap file
    ``c/k`` present to its size (from the shard's listing); a record's bytes go through the
    store's cache under ``<index digest>/<a>-<b>`` when it has one."""

    def __init__(self, store: RemoteStore, prefix: str, where: str, total: int, outer: int, inner: int,
                 files: dict[int, int], digest: str):
        super().__init__(Path(prefix), where, total, outer, inner)
        self.store, self.prefix, self.files, self.digest = store, prefix, files, digest

    def _key(self, k: int) -> str:
        return f"{self.prefix}/c/{k}"

    def _shard_index(self, k: int) -> tuple[int, np.ndarray]:
        got = self._index.get(k)
        if got is not None:
            return got
        size = self.files.get(k)
        if size is None:  # zarr does not write a shard whose chunks are all fill value
            got = (-1, np.full((self.per_shard, 2), np.iinfo(np.uint64).max, dtype=np.uint64))
        else:
            index_bytes = self.per_shard * 16
            start = size - index_bytes - 4
            tail = self.store.cached(f"{self.digest}/c{k}.index", index_bytes + 4,
                                     lambda: self.store.get_range(self._key(k), start, size)) if start >= 0 else b""
            got = (0, self.check_index(k, tail, size))
        self._index[k] = got
        return got

    def _fetch(self, a: int, b: int) -> bytes:
        # The pieces of _pieces, coalesced when adjacent (one request per run of a heap file).
        pieces: list[list[int]] = []
        for k, offset, n in self._pieces(a, b):
            last = pieces[-1] if pieces else None
            if last is not None and last[0] == k and (k < 0 or last[1] + last[2] == offset):
                last[2] += n
            else:
                pieces.append([k, offset, n])
        parts = []
        for k, offset, n in pieces:
            if k < 0:
                parts.append(bytes(n))
                continue
            data = self.store.get_range(self._key(k), offset, offset + n)
            if len(data) != n:
                raise ShardFormatError(f"{self.where}: heap file c/{k} is truncated")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, a: int, b: int) -> bytes:
        """Heap bytes [a, b)."""
        return self.store.cached(f"{self.digest}/{a}-{b}", b - a, lambda: self._fetch(a, b))

    def close(self) -> None:
        self._index.clear()


@dataclass(frozen=True)
class ShardProblem:
    """One thing wrong with a shard: the shard's name, the record at fault (its index
    inside the shard) when one is, and the reason."""

    shard: str
    reason: str
    record: int | None = None
    source: str | None = None

    def describe(self, first: int = 0, where: str | None = None, exclude: list[int] | tuple[int, ...] = ()) -> str:
        """One line naming ``where`` (default: the shard's name) and, for a record, its global
        index (``first`` is the global index of the shard's first visible record; ``exclude``
        the shard's excluded local indices) and local index."""
        head = where if where is not None else self.shard
        if self.record is None:
            return f"{head}: {self.reason}"
        src = f", source {self.source}" if self.source is not None else ""
        before = bisect.bisect_left(exclude, self.record)
        if before < len(exclude) and exclude[before] == self.record:
            return f"{head}: excluded record (local {self.record}{src}): {self.reason}"
        return f"{head}: record {first + self.record - before} (local {self.record}{src}): {self.reason}"


@dataclass
class ShardIndex:
    """The index arrays of one shard, checked against the manifest, and its Zarr handles.

    On an object store ``group`` is an in-memory copy of the shard's small objects (the heap's
    chunks are not in it) and ``remote_heap`` reads the heap; locally ``remote_heap`` is None."""

    arrays: dict[str, np.ndarray]
    group: Any
    heap: Any
    remote_heap: _RemoteHeap | None = None

    def read(self, a: int, b: int) -> bytes:
        """Heap bytes [a, b) (through zarr locally: for bulk reads such as verify's windows)."""
        return self.remote_heap.read(a, b) if self.remote_heap is not None else self.heap[a:b].tobytes()


def _offsets_problem(name: str, off: np.ndarray, heap_size: int) -> ShardProblem | None:
    """The first record whose offsets break "start at 0, increase, end at the heap size"."""
    if off.size == 0:
        return ShardProblem(name, "inconsistent offsets: the offsets array is empty")
    if off[0] != 0:
        return ShardProblem(name, f"inconsistent offsets: they start at {int(off[0])}, not 0", 0)
    bad = np.flatnonzero(np.diff(off) <= 0)
    if bad.size:
        i = int(bad[0])
        return ShardProblem(name, f"inconsistent offsets: [{int(off[i])}, {int(off[i + 1])}) do not increase", i)
    beyond = np.flatnonzero(off > heap_size)
    if beyond.size:
        i = max(int(beyond[0]) - 1, 0)
        return ShardProblem(name, f"inconsistent offsets: {int(off[i + 1])} lies beyond the heap "
                                  f"({heap_size} bytes)", i)
    if off[-1] != heap_size:
        return ShardProblem(name, f"inconsistent offsets: they end at {int(off[-1])} but the heap holds "
                                  f"{heap_size} bytes")
    return None


class _ShardObjects(MemoryStore):
    """A read-only in-memory Zarr store of one remote shard's small objects (keys relative to
    the shard); the keys in ``lazy`` (the source array's chunks: ~100 bytes a record, read only
    to name a record) are fetched from the object store on first read. Keys in neither do not
    exist (for the heap's chunk files: never read through zarr, see :class:`_RemoteHeap`)."""

    def __init__(self, small: dict[str, bytes], remote: RemoteStore, name: str, lazy: set[str]):
        super().__init__({k: cpu.Buffer.from_bytes(v) for k, v in small.items()}, read_only=True)
        self._remote, self._name, self._lazy = remote, name, lazy

    def _fill(self, key: str) -> None:
        if key in self._lazy and key not in self._store_dict:
            self._store_dict[key] = cpu.Buffer.from_bytes(self._remote.get(f"{self._name}/{key}"))

    def get_sync(self, key: str, **kw: Any) -> Any:
        self._fill(key)
        return super().get_sync(key, **kw)

    async def get(self, key: str, *args: Any, **kw: Any) -> Any:
        self._fill(key)
        return await super().get(key, *args, **kw)


def _remote_shard_objects(store: RemoteStore, name: str) -> tuple[_ShardObjects, dict[int, int], bytes] | None:
    """Shard ``name``'s small objects, fetched whole (the sources on first use), {k: size} of
    its heap files ``bytes/c/k`` and the heap's ``zarr.json`` (None when the shard has no
    objects at all). Network failures raise (RemoteAccessError): they are not a property of the data."""
    listing = store.list(name)
    if f"{name}/zarr.json" not in listing:
        return None
    heap_prefix = f"{name}/bytes/c/"
    heap_files: dict[int, int] = {}
    small: dict[str, bytes] = {}
    lazy: set[str] = set()
    for key, size in sorted(listing.items()):
        rel = key[len(name) + 1:]
        if key.startswith(heap_prefix) and key[len(heap_prefix):].isdigit():
            heap_files[int(key[len(heap_prefix):])] = size
        elif rel.startswith("source/c/"):
            lazy.add(rel)
        else:
            small[rel] = store.get(key)
    return _ShardObjects(small, store, name, lazy), heap_files, small.get("bytes/zarr.json", b"")


def check_shard(root: str | os.PathLike | RemoteStore,
                entry: dict[str, Any]) -> tuple[ShardIndex | None, list[ShardProblem]]:
    """Validate one shard's files and index against its manifest ``entry``.

    Returns the index (None when record boundaries cannot be trusted: missing or unreadable
    shard, unknown schema, wrong array shapes, bad offsets) and every problem found, in the
    order a reader reports them: presence, readability, schema, shapes, digest, heap size,
    offsets. Record contents (crc32, decoding) are not read here.
    """
    name = entry["name"]
    root = open_root(root)
    n = stored_count(entry)
    heap_files: dict[int, int] | None = None
    heap_meta = b""
    if isinstance(root, RemoteStore):
        opened = _remote_shard_objects(root, name)
        if opened is None:
            return None, [ShardProblem(name, f"shard listed in the manifest is missing (no objects under "
                                             f"{join(root.url, name)}/)")]
        zarr_store, heap_files, heap_meta = opened
    elif not (root / name).is_dir():
        return None, [ShardProblem(name, "shard listed in the manifest is missing")]
    else:
        zarr_store = str(root / name)
    try:
        group = zarr.open_group(zarr_store, mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        arrays = {k: np.asarray(group[k][:]) for k in INDEX_ARRAYS}
        heap = group["bytes"]
    except (KeyError, FileNotFoundError, ValueError, TypeError, OSError) as e:
        return None, [ShardProblem(name, f"unreadable shard ({type(e).__name__}: {e})")]
    if attrs.get("schema") != SCHEMA_VERSION:
        return None, [ShardProblem(name, f"unknown schema {attrs.get('schema')!r} "
                                         f"(this version reads schema {SCHEMA_VERSION})")]
    off = arrays["offsets"]
    if not (off.dtype == np.int64 and off.shape == (n + 1,)
            and all(arrays[k].shape == (n,) for k in INDEX_ARRAYS[1:])):
        return None, [ShardProblem(name, f"index arrays do not hold the manifest's {n} records")]
    problems = []
    exclude = entry.get("exclude", ())
    if exclude and exclude[-1] >= n:
        return None, [ShardProblem(name, f"the manifest excludes local record {exclude[-1]} but the shard "
                                         f"holds {n} records")]
    if index_digest(arrays) != entry["index_sha256"]:
        problems.append(ShardProblem(name, "index digest does not match the manifest (index corrupted)"))
    heap_size = int(heap.shape[0])
    if heap_size != entry["bytes"]:
        problems.append(ShardProblem(name, f"heap holds {heap_size} bytes, the manifest says {entry['bytes']}"))
    bad_offsets = _offsets_problem(name, off, heap_size)
    if bad_offsets is not None:
        problems.append(bad_offsets)
        return None, problems
    remote_heap = None
    if isinstance(root, RemoteStore):
        assert heap_files is not None
        layout = _DirectHeap.layout(json.loads(heap_meta), heap_size)
        if layout is None:
            problems.append(ShardProblem(name, "the heap array's layout is not the one smae-pack writes "
                                               "(needed to read it from an object store)"))
            return None, problems
        remote_heap = _RemoteHeap(root, f"{name}/bytes", f"{root}/{name}", heap_size, *layout, heap_files,
                                  entry["index_sha256"])
    return ShardIndex(arrays, group, heap, remote_heap), problems


class _OpenShard:
    """Index arrays of one shard, validated by :func:`check_shard`, plus a handle on its heap."""

    def __init__(self, root: Root, entry: dict[str, Any], first: int = 0):
        name = entry["name"]
        index, problems = check_shard(root, entry)
        if problems:
            raise ShardFormatError(problems[0].describe(first, where=f"{root}/{name}",
                                                        exclude=entry.get("exclude", ())))
        assert index is not None
        arrays = index.arrays
        self.name = name
        self.offsets = arrays["offsets"]
        self.height = arrays["height"]
        self.width = arrays["width"]
        self.phash = arrays["phash"]
        self.crc32 = arrays["crc32"]
        self.heap = index.heap
        self.direct = index.remote_heap if isinstance(root, RemoteStore) else \
            _DirectHeap.open(root / name / "bytes", f"{root}/{name}", int(index.heap.shape[0]))
        self._group = index.group
        self._source: np.ndarray | None = None

    def read(self, a: int, b: int) -> bytes:
        return self.direct.read(a, b) if self.direct is not None else self.heap[a:b].tobytes()

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()

    def source(self, j: int) -> str:
        if self._source is None:
            self._source = np.asarray(self._group["source"][:], dtype=object)
        return str(self._source[j])


CRC_MISMATCH = "fails its crc32 check"


class RecordCorruptError(ShardFormatError):
    """A record's bytes do not match its stored checksum."""

    def __init__(self, shard: str, record: int, local: int, exclude: list[int] | tuple[int, ...] = ()):
        first = record - (local - bisect.bisect_left(exclude, local))
        super().__init__(ShardProblem(shard, CRC_MISMATCH, local).describe(first, exclude=exclude))
        self.shard, self.record, self.local = shard, record, local


class ShardedDataset:
    """Random access to the records of a packed dataset.

    Shards are opened and validated lazily on first access, so constructing the
    dataset costs one manifest read; it pickles without open handles (DALI and
    DataLoader workers reopen what they touch). ``root`` may be an object store URL
    (``s3://bucket/prefix``), read with ``remote`` options (retries, cache).
    """

    def __init__(self, root: str | os.PathLike | RemoteStore, verify_crc: bool = True,
                 remote: RemoteOptions | None = None):
        # Set first: __del__ (close) runs even when the manifest below is refused.
        self._open: dict[int, _OpenShard] = {}
        self.root = open_root(root, remote)
        self.verify_crc = verify_crc
        self.manifest = read_manifest(self.root)
        self._entries = self.manifest["shards"]
        counts = np.asarray([s["count"] for s in self._entries], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        # Per shard with exclusions: exclude[k] - k, the visible records before the k-th
        # excluded one; visible j is stored at j + (how many of these are <= j).
        self._skips = {s: np.asarray(e["exclude"], dtype=np.int64) - np.arange(len(e["exclude"]))
                       for s, e in enumerate(self._entries) if e.get("exclude")}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def close(self) -> None:
        """Release open file descriptors (reopened on the next access)."""
        for sh in self._open.values():
            sh.close()
        self._open.clear()

    def __del__(self) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    def locate(self, i: int) -> tuple[int, int]:
        """Record index -> (shard index, index inside the shard's stored records)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for a dataset of {n}")
        i %= n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[s])
        skips = self._skips.get(s)
        if skips is not None:
            j += int(np.searchsorted(skips, j, side="right"))
        return s, j

    def shard(self, s: int) -> _OpenShard:
        sh = self._open.get(s)
        if sh is None:
            sh = self._open[s] = _OpenShard(self.root, self._entries[s], int(self._starts[s]))
        return sh

    def _at(self, i: int) -> tuple[_OpenShard, int]:
        s, j = self.locate(i)
        return self.shard(s), j

    def read(self, i: int) -> bytes:
        s, j = self.locate(i)
        sh = self.shard(s)
        data = sh.read(int(sh.offsets[j]), int(sh.offsets[j + 1]))
        if self.verify_crc and zlib.crc32(data) != int(sh.crc32[j]):
            raise RecordCorruptError(sh.name, i % len(self), j, self._entries[s].get("exclude", ()))
        return data

    def shape(self, i: int) -> tuple[int, int]:
        sh, j = self._at(i)
        return int(sh.height[j]), int(sh.width[j])

    def phash(self, i: int) -> int:
        sh, j = self._at(i)
        return int(sh.phash[j])

    def source(self, i: int) -> str:
        sh, j = self._at(i)
        return sh.source(j)
