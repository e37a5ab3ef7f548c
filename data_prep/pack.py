"""Orchestration of ``smae-pack``: enumerate, process in parallel, dedup, write shards.

Pipeline::

    enumerate inputs (sources.py, deterministic order)
      -> batches of inputs, processed by N worker processes (worker.py), each batch's
         result persisted atomically in the work directory (work.py)
      -> consumed strictly in batch order by the main process:
         near-duplicate filter (dedup.py) -> ShardWriter, ``images_per_shard`` records
         per shard, each finalized by atomic rename and logged in the work directory
      -> manifest.json (the commit point) -> work directory removed

The whole run holds an exclusive lock on ``--out`` (:class:`selectivemae_ds.locking.DirLock`,
``OUT/.lock``): a second run on the same directory refuses at once naming the holder, or
waits ``--wait-lock`` seconds. The kernel drops the lock when the holder dies (kill -9
included), so the rerun after a crash resumes without any cleanup.

Why the output cannot depend on N: every decision that shapes the output (the record
order, dedup, the shard boundaries) is taken by the main process in batch order; workers
only compute pure functions of their inputs. Batch size is a function of the number of
inputs, not of N.

Resume: a rerun with the same inputs and options reuses every committed batch and skips
every shard logged as finalized; dedup is replayed from the batch metas (hashes only,
milliseconds), so later records see exactly the same kept set as in an uninterrupted
run. A shard directory that exists but is not logged (kill between rename and log) is
removed and written again, as are temporary files of an interrupted writer.

Parts (``--part i/n``, :mod:`data_prep.parts`): the run lists every input as above, takes
its contiguous share and packs it exactly like a single-node run into ``OUT/part-i-of-n/``
(its own lock, work directory and manifest), with one difference: a record that dedup
drops is still stored, and listed in its shard's ``exclude``; ``smae-pack merge``
replays dedup over the records of all parts in the global order and needs every one of
them (a record dropped inside a share may survive globally when what it duplicated is
itself a duplicate of an earlier part's record).

Object storage (``--out s3://bucket/prefix``, :mod:`selectivemae_ds.data.store`): the run
packs into a local staging directory exactly as above (its lock, work directory and resume
logic) and publishes as it goes: each shard's objects are uploaded when the shard is
finalized (the group's ``zarr.json`` last), before the shard is logged as done, and its
local copy is removed; ``manifest.json`` is uploaded last. A PUT is atomic, so a reader
never sees half an object, and the manifest names only shards already uploaded. A rerun
resumes from the staging directory (a logged shard must still be in the bucket); when it
is lost, the rerun repacks and uploads the same objects again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from data_prep import worker
from data_prep.dedup import NearDuplicateIndex
from data_prep.images import PackOptions
from data_prep.parts import check_part, check_part_root, part_dir, part_params, refuse_parts_in, share_bounds
from data_prep.sources import KIND_TAR, InputItem, InputReadError, TarReader, describe_sources, enumerate_inputs
from data_prep.work import WORK_DIR_NAME, WorkDir, fingerprint_of
from selectivemae_ds.atomic import atomic_write_text, check_writable_dir
from selectivemae_ds.data.shards import (
    MANIFEST_NAME, SCHEMA_VERSION, ShardInfo, ShardWriter, read_manifest, shard_name, write_manifest,
)
from selectivemae_ds.data.store import RemoteStore, is_remote
from selectivemae_ds.errors import ConfigError, DataError, RunError
from selectivemae_ds.locking import LOCK_NAME, DirLock

DEFAULT_IMAGES_PER_SHARD = 4096
DEFAULT_DEDUP_DISTANCE = 4
MAX_BATCH = 256
SAMPLES_PER_REASON = 20

REPORTED_REASONS: tuple[str, ...] = (
    "corrupt", "too_small", "duplicate", "too_large_pixels", "too_large_file",
    "unreadable", "not_image", "empty", "broken_archive",
)
"""Reasons always present in the report (with 0 when none occurred)."""

_SHARD_DIR = re.compile(r"shard-\d{5}\.zarr")
_OUR_TEMP_PREFIXES = (".shard-", ".manifest.")


@dataclass
class PackConfig:
    """Everything a packing run depends on."""

    sources: list[str]
    """Directories, archives or image files, in order."""
    out: Path | str
    """Output dataset directory, or an object store URL (``s3://bucket/prefix``)."""
    workers: int = 1
    """Worker processes; 1 processes inline. Does not change the output."""
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
    """Records per shard (the last shard holds the remainder)."""
    dedup_distance: int = DEFAULT_DEDUP_DISTANCE
    """Hamming distance for near-duplicates; 0 exact only; negative disables dedup."""
    options: PackOptions = field(default_factory=PackOptions)
    """Per-image processing options."""
    restart: bool = False
    """Discard an earlier run's state in ``out`` instead of resuming it."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""
    wait_lock: float = 0.0
    """Seconds to wait for another run holding ``out`` to finish; 0 refuses at once."""
    part: tuple[int, int] | None = None
    """``(i, n)``: pack only share ``i`` (0-based) of ``n`` into ``out/part-i-of-n``."""
    staging: Path | None = None
    """``out`` on an object store: the local directory the run packs in before uploading
    (default: :func:`default_staging`, under TMPDIR, named after ``out``)."""


def default_staging(url: str) -> Path:
    """The staging directory of an object store ``--out``: fixed for a URL, so a rerun resumes."""
    tag = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "smae-pack-staging" / tag


def shard_uploaded(store: RemoteStore, name: str) -> bool:
    """Whether shard ``name`` is complete in the store (its group's zarr.json, uploaded last)."""
    return store.exists(f"{name}/zarr.json")


def upload_shard(store: RemoteStore, out: Path, name: str) -> None:
    """PUT every file of the finalized shard ``out/name`` under ``name/``, its group's
    ``zarr.json`` last (present means complete), then remove the local copy."""
    local = out / name
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p == local / "zarr.json")
    for p in files:
        store.put_file(f"{name}/{p.relative_to(local).as_posix()}", p)
    shutil.rmtree(local)


def batch_size_for(n_inputs: int) -> int:
    """Inputs per batch: small sets still spread over workers, big ones keep the work
    directory at ~n/256 files. A function of the input count only (resume relies on it)."""
    return min(MAX_BATCH, max(1, math.ceil(n_inputs / 64)))


class Stats:
    """Counters of a run; rebuilt identically on resume from the batch metas."""

    def __init__(self) -> None:
        self.inputs = 0
        self.packed = 0
        self.sliced = 0
        self.passthrough = 0
        self.skipped: dict[str, int] = {r: 0 for r in REPORTED_REASONS}
        self.samples: dict[str, list[dict[str, str]]] = {}

    def skip(self, reason: str, source: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        bucket = self.samples.setdefault(reason, [])
        if len(bucket) < SAMPLES_PER_REASON:
            bucket.append({"source": source, "detail": detail} if detail else {"source": source})

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "packed": self.packed,
            "sliced": self.sliced,
            "passthrough": self.passthrough,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_samples": {k: v for k, v in sorted(self.samples.items())},
        }


class ShardAssembler:
    """Consumes batch results in order: dedup, then append records to shards."""

    def __init__(self, out: Path, work: WorkDir, per_shard: int, dedup: NearDuplicateIndex,
                 done: list[dict[str, Any]], keep_duplicates: bool = False,
                 publish: Callable[[str], None] | None = None):
        self.out = out
        self.publish = publish
        """Called with a finalized shard's name before it is logged as done (uploads it)."""
        self.work = work
        self.per_shard = per_shard
        self.dedup = dedup
        self.done = done
        self.keep_duplicates = keep_duplicates
        """Store duplicates too, listed in their shard's ``exclude`` (a part of a multi-node pack)."""
        self.stats = Stats()
        self._stored = 0
        self._writer: ShardWriter | None = None
        self._excluded: list[int] = []
        self._with_payload: list[int] = []

    def consume(self, batch: int, meta: dict[str, Any],
                load_payload: Callable[[int, dict[str, Any]], bytes]) -> None:
        payload: bytes | None = None
        offset = 0
        st = self.stats
        for entry in meta["items"]:
            st.inputs += 1
            if entry["reason"] is not None:
                st.skip(entry["reason"], entry["source"], entry["detail"])
                continue
            st.sliced += int(entry["sliced"])
            st.passthrough += int(entry["passthrough"])
            for source, height, width, phash, length in entry["records"]:
                start, offset = offset, offset + length
                kept = self.dedup.offer(phash)
                if kept:
                    st.packed += 1
                else:
                    st.skip("duplicate", source)
                    if not self.keep_duplicates:
                        continue
                index = self._stored
                self._stored += 1
                if index // self.per_shard < len(self.done):
                    continue  # its shard is finalized already (resumed run)
                if payload is None:
                    payload = load_payload(batch, meta)
                if self._writer is None:
                    self._writer = ShardWriter(self.out, shard_name(index // self.per_shard))
                if not kept:
                    self._excluded.append(len(self._writer))
                self._writer.add(payload[start:offset], height, width, phash, source)
                if len(self._writer) == self.per_shard:
                    self._finalize(batch)
        self._with_payload.append(batch)

    def _finalize(self, current_batch: int) -> None:
        assert self._writer is not None
        info = self._writer.finalize()
        info = replace(info, count=info.count - len(self._excluded), exclude=tuple(self._excluded))
        if self.publish is not None:
            self.publish(info.name)
        self._writer = None
        self._excluded = []
        self.done.append(info.to_json())
        self.work.write_shards(self.done)
        # Every record of the batches before the current one is now in a finalized
        # shard: their payloads are dead weight (the metas stay for dedup replay).
        keep = []
        for b in self._with_payload:
            if b < current_batch:
                self.work.drop_payload(b)
            else:
                keep.append(b)
        self._with_payload = keep

    def finish(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._finalize(sys.maxsize)
        return [ShardInfo.from_json(s) for s in self.done]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _inputs_digest(items: list[InputItem]) -> str:
    rows = [[i.source, i.kind, i.member, i.size, i.mtime_ns, i.reason] for i in items]
    return fingerprint_of({"items": rows})


def _describe(cfg: PackConfig, items: list[InputItem], batch: int) -> dict[str, Any]:
    """The options and inputs that determine the output (not workers, not progress)."""
    return {
        "tool": "smae-pack",
        "schema": SCHEMA_VERSION,
        "sources": describe_sources(cfg.sources),
        "inputs": len(items),
        "inputs_sha256": _inputs_digest(items),
        "options": asdict(cfg.options),
        "images_per_shard": cfg.images_per_shard,
        "dedup_distance": cfg.dedup_distance,
        "batch_size": batch,
    }


def _is_ours(name: str) -> bool:
    return (name in (MANIFEST_NAME, WORK_DIR_NAME, LOCK_NAME) or _SHARD_DIR.fullmatch(name) is not None
            or name.startswith(_OUR_TEMP_PREFIXES))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clear_ours(out: Path) -> None:
    # The lock file stays: this run holds it, and unlinking a held lock file would let a
    # second run lock a fresh file of the same name.
    for p in sorted(out.iterdir()):
        if _is_ours(p.name) and p.name != LOCK_NAME:
            _remove(p)


def _prepare_out(cfg: PackConfig, out: Path, fingerprint: str, description: dict[str, Any],
                 present: Callable[[str], bool] | None = None) -> str:
    """Bring ``out`` (``--out``, this part's directory in it, or the staging directory of an
    object store ``--out``) into a state this run can continue from; return "fresh run",
    "resumed run" or "complete". ``present(name)``: whether a shard logged as done is still
    where the dataset lives (default: a directory in ``out``)."""
    if present is None:
        def present(name: str) -> bool:
            return (out / name).is_dir()
    work = WorkDir(out)
    has_manifest = (out / MANIFEST_NAME).is_file()
    if cfg.restart:
        _clear_ours(out)
    elif work.exists():
        previous = work.read_fingerprint()
        if previous is not None and previous != fingerprint:
            raise ConfigError(
                f"{out} holds an unfinished run with different inputs or options. Rerun the original "
                "command to finish it, use a fresh --out, or add --restart to discard it.")
    elif has_manifest:
        params = read_manifest(out).get("params", {})
        if params.get("fingerprint") == fingerprint:
            return "complete"
        raise ConfigError(
            f"{out} already holds a dataset packed from different inputs or options. "
            "Use a fresh --out, or add --restart to replace it.")
    else:
        foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
        if foreign:
            raise ConfigError(f"--out {out} is not empty and was not written by smae-pack "
                            f"(found {foreign[:3]}); choose an empty or new directory")
    resumed = work.exists() and work.read_fingerprint() == fingerprint
    if not resumed:
        work.create(fingerprint, description)
    # Leftovers of an interrupted writer: spool files, partial shard dirs, manifest temps.
    for p in sorted(out.iterdir()):
        if p.name.startswith(_OUR_TEMP_PREFIXES):
            _remove(p)
    done = work.read_shards()
    keep: list[dict[str, Any]] = []
    for s in done:
        if s["name"] == shard_name(len(keep)) and present(s["name"]):
            keep.append(s)
        else:
            break
    if len(keep) != len(done):
        work.write_shards(keep)
    kept_names = {s["name"] for s in keep}
    for p in sorted(out.iterdir()):
        if _SHARD_DIR.fullmatch(p.name) and p.name not in kept_names:
            _remove(p)  # renamed into place but never logged: rewritten below
    return "resumed run" if resumed else "fresh run"


def _preread_tar(tars: TarReader, chunk: list[InputItem]) -> dict[int, bytes | tuple[str, str]]:
    """Bytes (or ``(reason, detail)``) of the tar members of a batch, by position."""
    got: dict[int, bytes | tuple[str, str]] = {}
    for pos, item in enumerate(chunk):
        if item.kind == KIND_TAR and item.reason is None:
            try:
                got[pos] = tars.read(item)
            except InputReadError as e:
                got[pos] = (e.reason, e.detail)
    return got


def _batch_results(items: list[InputItem], batch: int, workers: int, work: WorkDir,
                   options: PackOptions, out: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(batch number, meta) in batch order, computing only the batches not committed yet.

    At most ``2 * workers`` batches are in flight or buffered: a bounded window, unlike
    ``Pool.imap`` whose feeder would read every tar member into memory up front.
    """
    n_batches = math.ceil(len(items) / batch) if items else 0
    tars = TarReader(options.max_pixels)

    def preread(chunk: list[InputItem]) -> dict[int, bytes | tuple[str, str]]:
        return _preread_tar(tars, chunk)

    def chunk_of(b: int) -> list[InputItem]:
        return items[b * batch:(b + 1) * batch]

    try:
        if workers <= 1:
            worker.init_worker(options, str(out))
            for b in range(n_batches):
                meta = work.read_meta(b)
                if meta is None:
                    chunk = chunk_of(b)
                    meta = worker.process_batch(b, chunk, preread(chunk))
                yield b, meta
            return
        ctx = multiprocessing.get_context("spawn")  # no fork: Zarr and tqdm run threads here
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker.init_pool_worker,
                                 initargs=(options, str(out), os.getpid())) as pool:
            window: deque[tuple[int, dict[str, Any] | Future[dict[str, Any]]]] = deque()
            next_b = 0
            try:
                while next_b < n_batches or window:
                    while next_b < n_batches and len(window) < 2 * workers:
                        meta = work.read_meta(next_b)
                        if meta is None:
                            chunk = chunk_of(next_b)
                            window.append((next_b, pool.submit(worker.process_batch, next_b, chunk,
                                                                preread(chunk))))
                        else:
                            window.append((next_b, meta))
                        next_b += 1
                    b, pending = window.popleft()
                    yield b, pending.result() if isinstance(pending, Future) else pending
            except BrokenProcessPool as e:
                raise RunError("a worker process died (killed or out of memory); rerun the same "
                                "command to resume from the last committed batch") from e
            except MemoryError as e:
                raise RunError("a worker ran out of memory on a batch (none of it was kept); lower --workers "
                                "or --max-pixels, then rerun the same command to resume from the last committed "
                                "batch") from e
            finally:
                for _b, pending in window:
                    if isinstance(pending, Future):
                        pending.cancel()
    finally:
        tars.close()


def _load_payload_or_recompute(work: WorkDir, items: list[InputItem], batch: int,
                               options: PackOptions, out: Path) -> Callable[[int, dict[str, Any]], bytes]:
    def load(b: int, meta: dict[str, Any]) -> bytes:
        try:
            return work.read_payload(b, meta)
        except FileNotFoundError:
            # Reachable after a power cut (batch files are not fsynced) or when work
            # files were deleted by hand: the batch is a pure function of its inputs, so
            # it is recomputed rather than failing the run.
            worker.init_worker(options, str(out))
            chunk = items[b * batch:(b + 1) * batch]
            tars = TarReader(options.max_pixels)
            try:
                pre = _preread_tar(tars, chunk)
            finally:
                tars.close()
            fresh = worker.process_batch(b, chunk, pre)
            if fresh["items"] != meta["items"]:
                raise DataError(f"batch {b} recomputed differently from its committed result: "
                                "inputs changed during the run; rerun with --restart")
            return work.read_payload(b, fresh)
    return load


def summary_from(stats: dict[str, Any], shards: int, seconds: float, out: Path | str, workers: int,
                 ignored: int, state: str, part: tuple[int, int] | None = None) -> dict[str, Any]:
    """The report document (also what is printed); ``part`` (i, n) for one part of a
    multi-node pack, whose ``packed`` and ``duplicate`` count its share alone."""
    doc = dict(stats)
    if part is not None:
        doc["part"] = f"{part[0]}/{part[1]}"
    doc.update({
        "out": str(out),
        "shards": shards,
        "ignored_files": ignored,
        "seconds": round(seconds, 3),
        "inputs_per_second": round(stats["inputs"] / seconds, 2) if seconds > 0 else None,
        "workers": workers,
        "run": state,
    })
    return doc


def format_summary(doc: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k}={v}" for k, v in doc["skipped"].items() if v) or "none"
    head = f"smae-pack: part {doc['part']}:" if "part" in doc else "smae-pack:"
    return (f"{head} packed {doc['packed']} records from {doc['inputs']} inputs into {doc['shards']} shard(s) "
            f"in {doc['seconds']:.1f} s ({doc['run']}, {doc['workers']} worker(s))\n"
            f"  sliced inputs: {doc['sliced']}, JPEG passed through: {doc['passthrough']}\n"
            f"  skipped: {skipped}\n"
            f"  ignored (not an image or archive name): {doc['ignored_files']} file(s)\n"
            f"  output: {doc['out']}")


def _check_config(cfg: PackConfig) -> None:
    if cfg.images_per_shard < 1:
        raise ConfigError(f"--images-per-shard must be >= 1, got {cfg.images_per_shard}")
    if cfg.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.dedup_distance > 32:
        raise ConfigError(f"--dedup-distance above 32 would call unrelated images duplicates "
                          f"(got {cfg.dedup_distance})")
    if cfg.wait_lock < 0:
        raise ConfigError(f"--wait-lock must be >= 0 seconds, got {cfg.wait_lock}")
    if cfg.part is not None:
        check_part(cfg.part)
    for src in cfg.sources:
        if not os.path.lexists(src):
            raise ConfigError(f"input {src!r} does not exist")


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def pack(cfg: PackConfig) -> dict[str, Any]:
    """Run (or resume, or confirm) a packing job; return the summary document.

    Raises :class:`ConfigError` for bad options and an unusable ``--out`` (checked before any
    work), :class:`RunError` when another run holds ``--out`` or the disk fills up (rerun the
    same command to resume), :class:`DataError` when the inputs yield no record.
    """
    t0 = time.monotonic()
    _check_config(cfg)
    store: RemoteStore | None = None
    if is_remote(cfg.out):
        if cfg.part is not None:
            raise ConfigError("--part: a multi-node pack writes to a shared file system, not an object store; "
                              "pack the parts and merge them there, then copy the dataset to the bucket")
        store = RemoteStore(str(cfg.out))
        out = check_writable_dir(cfg.staging or default_staging(store.url), "--staging")
        refuse_parts_in(out)
    else:
        cfg.out = Path(cfg.out)
        out = check_writable_dir(cfg.out, "--out")
        if cfg.part is not None:
            check_part_root(cfg.out)
            out = check_writable_dir(part_dir(cfg.out, *cfg.part), "--out part directory")
        else:
            refuse_parts_in(cfg.out)
    with DirLock(out, "smae-pack --out", wait=cfg.wait_lock):
        try:
            return _pack_locked(cfg, out, t0, store)
        except OSError as e:
            if e.errno in OUT_OF_SPACE:
                where = e.filename or out
                raise RunError(f"no space left on device ({errno.errorcode[e.errno]}) writing {where}; free "
                               f"space under {out} (or use another --out) and rerun the same command to "
                               "resume") from e
            if e.errno == errno.EROFS:
                raise ConfigError(f"--out {out} became read-only (EROFS) writing {e.filename or out}") from e
            raise


def _remote_done(cfg: PackConfig, store: RemoteStore, fingerprint: str) -> dict[str, Any] | None:
    """The bucket's manifest when it is this run's (nothing to do); None when there is none. A
    manifest of other inputs is refused, or with --restart deleted first, so no reader follows
    it into shards this run overwrites."""
    if not store.exists(MANIFEST_NAME):
        return None
    manifest = read_manifest(store)
    if not cfg.restart and manifest.get("params", {}).get("fingerprint") == fingerprint:
        return manifest
    if not cfg.restart:
        raise ConfigError(f"--out {store.url} already holds a dataset packed from different inputs or options. "
                          "Use a fresh --out, or add --restart to replace it.")
    store.delete(MANIFEST_NAME)
    return None


def _publish_manifest(store: RemoteStore, out: Path) -> None:
    """Upload the staged manifest (the commit point) and remove the local copy."""
    store.put_file(MANIFEST_NAME, out / MANIFEST_NAME)
    (out / MANIFEST_NAME).unlink()


def _pack_locked(cfg: PackConfig, out: Path, t0: float, store: RemoteStore | None = None) -> dict[str, Any]:
    if cfg.progress:
        print("smae-pack: listing inputs...", file=sys.stderr, flush=True)
    enum = enumerate_inputs(list(cfg.sources))
    if not enum.items:
        raise DataError(f"no inputs: {', '.join(map(str, cfg.sources))} hold no image or archive file "
                        f"({enum.ignored} file(s) ignored by name); nothing was packed")
    items = enum.items
    if cfg.part is not None:
        lo, hi = share_bounds(len(enum.items), *cfg.part)
        items = enum.items[lo:hi]
    batch = batch_size_for(len(items))
    description = _describe(cfg, enum.items, batch)
    if cfg.part is not None:
        description["part"] = part_params(description, cfg.part, (lo, hi))
    fingerprint = fingerprint_of(description)
    shown: Path | str = out if store is None else store.url
    present: Callable[[str], bool] | None = None
    publish: Callable[[str], None] | None = None
    if store is not None:
        manifest = _remote_done(cfg, store, fingerprint)
        if manifest is not None:
            _clear_ours(out)  # a kill after the manifest's upload left the staging state
            return summary_from(manifest["stats"], len(manifest["shards"]), time.monotonic() - t0, shown,
                                cfg.workers, enum.ignored, "already complete, nothing to do", cfg.part)
        present = partial(shard_uploaded, store)
        publish = partial(upload_shard, store, out)
    state = _prepare_out(cfg, out, fingerprint, description, present)
    if state == "complete":
        manifest = read_manifest(out)
        if store is not None:  # killed between writing the staged manifest and uploading it
            _publish_manifest(store, out)
        return summary_from(manifest["stats"], len(manifest["shards"]), time.monotonic() - t0, shown,
                            cfg.workers, enum.ignored, "already complete, nothing to do", cfg.part)

    work = WorkDir(out)
    asm = ShardAssembler(out, work, cfg.images_per_shard,
                         NearDuplicateIndex(cfg.dedup_distance, expected=max(len(items), 1)),
                         work.read_shards(), keep_duplicates=cfg.part is not None, publish=publish)
    load = _load_payload_or_recompute(work, items, batch, cfg.options, out)
    bar = tqdm(total=len(items), unit="img", disable=not cfg.progress, file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True, desc="smae-pack")
    try:
        for b, meta in _batch_results(items, batch, cfg.workers, work, cfg.options, out):
            asm.consume(b, meta, load)
            bar.update(len(meta["items"]))
            bar.set_postfix(packed=asm.stats.packed, skipped=sum(asm.stats.skipped.values()), refresh=False)
        shards = asm.finish()
    except BaseException:
        asm.abort()
        raise
    finally:
        bar.close()
    stats = asm.stats.to_json()
    stats["ignored_files"] = enum.ignored
    if not shards and cfg.part is None:
        reasons = ", ".join(f"{k}={v}" for k, v in stats["skipped"].items() if v)
        raise DataError(f"no records: every one of the {stats['inputs']} input(s) was skipped ({reasons}); "
                        "no dataset was written (run with --report FILE to see sample sources per reason)")
    params = dict(description)
    params["fingerprint"] = fingerprint
    # No timing in the manifest: the same inputs and options give a byte-identical file.
    write_manifest(out, shards, params, stats)
    if store is not None:
        _publish_manifest(store, out)
    work.remove()
    return summary_from(stats, len(shards), time.monotonic() - t0, shown, cfg.workers, enum.ignored, state,
                        cfg.part)


def write_report(path: Path, doc: dict[str, Any]) -> None:
    """Write the report JSON (the project's one atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
