"""The unit of parallel work: process one batch of inputs and persist its result.

Runs in worker processes (or inline with ``--workers 1``: same code, same bytes). It
imports neither Zarr nor tqdm so that spawning a worker stays cheap.

A batch's result goes straight to the work directory from the worker (payload, then the
meta file that commits it); only the small meta dict travels back to the main process,
which reads the payload from disk (page cache) when it writes the shard.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.images import Outcome, PackOptions, process_image
from data_prep.sources import KIND_TAR, InputItem, InputReadError, ZipCache, read_item
from data_prep.work import WorkDir


@dataclass
class _State:
    options: PackOptions
    work: WorkDir
    zips: ZipCache


_STATE: _State | None = None


def init_worker(options: PackOptions, out_dir: str) -> None:
    """Process initializer: options and the work directory, set once per process."""
    global _STATE
    _STATE = _State(options, WorkDir(Path(out_dir)), ZipCache())


def start_orphan_watchdog(parent: int, interval: float = 0.5) -> None:
    """Exit this worker when its parent dies.

    A pool worker blocks on its task queue forever once the main process is killed
    (``kill -9``, OOM killer); without this, every interrupted run would leave N idle
    processes behind. Whatever the worker was computing is lost harmlessly: batch results
    are only ever committed by an atomic rename. ``parent`` is passed in rather than read
    here: a parent killed while this process was still importing would otherwise already
    have been replaced by init as the parent, and the watchdog would never fire.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="smae-pack-orphan-watchdog", daemon=True).start()


def init_pool_worker(options: PackOptions, out_dir: str, parent: int) -> None:
    """Initializer of pool processes: :func:`init_worker` plus the orphan watchdog."""
    init_worker(options, out_dir)
    start_orphan_watchdog(parent)


def _outcome(item: InputItem, preread: bytes | tuple[str, str] | None, state: _State) -> Outcome:
    if item.reason is not None:
        return Outcome(reason=item.reason, detail=item.detail)
    try:
        if item.kind == KIND_TAR:
            if preread is None:
                raise InputReadError("broken_archive", "tar member was not read")
            if isinstance(preread, tuple):
                raise InputReadError(*preread)
            data = preread
        else:
            data = read_item(item, state.zips, state.options.max_pixels)
    except InputReadError as e:
        return Outcome(reason=e.reason, detail=e.detail)
    try:
        return process_image(data, item.source, state.options)
    except MemoryError:
        # The machine, not the image: counting it as corrupt would drop a good image from
        # the dataset. The batch stays uncommitted and a rerun packs it.
        raise
    except Exception as e:  # noqa: BLE001 - counted below, never silent
        # process_image maps every failure Pillow documents to a reason; a decoder
        # failing in a way nobody documented must still not stop a 13 M image run.
        # It is counted as corrupt with the exception named in the report sample.
        return Outcome(reason="corrupt", detail=f"unexpected {type(e).__name__}: {e}")


def process_batch(batch: int, items: list[InputItem],
                  preread: dict[int, bytes | tuple[str, str]]) -> dict[str, Any]:
    """Process ``items`` (batch number ``batch``), persist the result, return its meta.

    ``preread`` maps positions in ``items`` to the bytes of tar members, which the main
    process reads in archive order, or to ``(reason, detail)`` when that read failed.
    """
    state = _STATE
    if state is None:
        raise RuntimeError("init_worker() was not called in this process")
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for pos, item in enumerate(items):
        out = _outcome(item, preread.get(pos), state)
        recs = []
        for r in out.records:
            chunks.append(r.data)
            recs.append([r.source, r.height, r.width, r.phash, len(r.data)])
        entries.append({"source": item.source, "reason": out.reason, "detail": out.detail,
                        "sliced": out.sliced, "passthrough": out.passthrough, "records": recs})
    meta = {"batch": batch, "items": entries}
    # Zip handles stay open across batches: reopening parses the central directory,
    # which for a multi-million-member archive costs seconds.
    state.work.write_batch(batch, meta, b"".join(chunks))
    return meta
