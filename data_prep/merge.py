"""``smae-pack merge DIR``: join the parts of a multi-node pack into one dataset.

What it does, holding ``DIR/.lock`` and the lock of every part directory (so no part run
can change a part while it is read):

1. Finds the parts ``DIR/part-i-of-n`` and refuses, naming them, any that is missing,
   unfinished (no ``manifest.json``: killed or failed, rerun its command) or running (its
   lock is held); ``--wait SECONDS`` polls for them instead, then refuses.
2. Checks that every part was packed from the same plan (inputs, options, ``n``) and that
   their shares tile the input listing.
3. Replays near-duplicate removal over every stored record of every part, in the global
   order (part 0's records, then part 1's, ...), with the single-node rule: a record
   within ``D`` bits of an earlier *kept* record is dropped. Parts store the records their
   own dedup dropped (listed in ``exclude``), because a record dropped inside a share can
   survive globally: when the record it duplicated is itself a duplicate of an earlier
   part's record, the single-node run keeps it. The hashes come from the shards' index
   arrays, validated against each part's manifest (``shards.check_shard``).
4. Writes ``DIR/manifest.json`` atomically: the parts' shards in order, named
   ``part-i-of-n/shard-k.zarr``, each with the local indices the replay drops as its
   ``exclude`` (no shard is rewritten; a shard left with no visible record is omitted),
   and stats equal to what a single-node run reports.

The merged dataset reads like the single-node pack of the same inputs: the same records,
bytes, sources and order. The merge reads only index arrays (24 bytes per record plus
the digests), never a record's bytes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.dedup import NearDuplicateIndex
from data_prep.pack import REPORTED_REASONS, SAMPLES_PER_REASON
from data_prep.parts import MERGE_TOOL, PART_DIR, part_dir_name, part_dirs
from selectivemae_ds.atomic import check_writable_dir
from selectivemae_ds.data.shards import (
    MANIFEST_NAME, ShardFormatError, ShardInfo, check_shard, read_manifest, stored_count, write_manifest,
)
from selectivemae_ds.errors import ConfigError, DataError, RunError
from selectivemae_ds.locking import DirLock, holder_of

POLL_SECONDS = 2.0


@dataclass
class MergeConfig:
    out: Path
    """The directory holding ``part-i-of-n`` directories; receives ``manifest.json``."""
    wait: float = 0.0
    """Seconds to wait for missing, unfinished or running parts; 0 refuses at once."""
    progress: bool = True
    """Show a tqdm progress bar (shards replayed) on stderr."""


@dataclass
class _Part:
    index: int
    path: Path
    manifest: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.index}/{self.manifest['params']['part']['of']}"


def _part_count(root: Path) -> int | None:
    """``n`` from the part directories' names; None when there are none yet."""
    ns = {int(PART_DIR.fullmatch(name).group(2)) for name in part_dirs(root)}  # type: ignore[union-attr]
    if len(ns) > 1:
        raise ConfigError(f"{root} holds parts of packs split different ways (of {sorted(ns)}): "
                          f"{', '.join(part_dirs(root)[:6])}; keep the directories of one --part I/N split")
    return ns.pop() if ns else None


def _take_parts(root: Path, n: int) -> tuple[list[DirLock], list[str]]:
    """Lock every finished part; return the locks and a line per part that is not ready."""
    locks: list[DirLock] = []
    not_ready: list[str] = []
    for i in range(n):
        path = root / part_dir_name(i, n)
        if not path.is_dir():
            not_ready.append(f"{i}/{n} missing ({path.name} does not exist)")
            continue
        try:
            lock = DirLock(path, "smae-pack --out")
        except RunError:
            not_ready.append(f"{i}/{n} running ({holder_of(path)})")
            continue
        if not (path / MANIFEST_NAME).is_file():
            lock.release()
            not_ready.append(f"{i}/{n} unfinished (no {MANIFEST_NAME}: killed or failed; rerun its command "
                             "to resume it)")
            continue
        locks.append(lock)
    return locks, not_ready


def _wait_for_parts(root: Path, wait: float) -> tuple[int, list[DirLock]]:
    """``n`` and the locks of all ``n`` finished parts, polling up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        n = _part_count(root)
        if n is not None:
            locks, not_ready = _take_parts(root, n)
            if not not_ready:
                return n, locks
            for lock in locks:
                lock.release()
            why = f"not every part is finished: {'; '.join(not_ready[:20])}"
            if len(not_ready) > 20:
                why += f"; ... and {len(not_ready) - 20} more"
        else:
            why = "it holds no part directory (part-I-of-N) yet; pack with --part I/N first"
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f" after waiting {wait:g} s" if wait > 0 else ""
            raise RunError(f"cannot merge {root}{waited}: {why}. Rerun 'smae-pack merge' when they are done "
                           "(or add --wait SECONDS)")
        time.sleep(min(POLL_SECONDS, left))


def _read_parts(root: Path, n: int) -> list[_Part]:
    """The parts' manifests, checked to come from one plan and to tile the input listing."""
    parts = [_Part(i, root / part_dir_name(i, n), read_manifest(root / part_dir_name(i, n))) for i in range(n)]
    first = parts[0].manifest["params"]
    expected_start = 0
    for part in parts:
        params = part.manifest["params"]
        info = params.get("part")
        if not isinstance(info, dict) or info.get("index") != part.index or info.get("of") != n:
            raise ConfigError(f"{part.path}: its manifest is not that of part {part.index}/{n} "
                              f"(part entry {info!r}); was the directory renamed or copied from another pack?")
        if info["plan"] != first["part"]["plan"]:
            raise ConfigError(f"part {part.index}/{n} ({part.path.name}) was packed from other inputs or options "
                              f"than part 0/{n}: every part must run the same command but for --part (and see the "
                              "same input files); rerun that part with --restart")
        if info["first_input"] != expected_start:
            raise ConfigError(f"part {part.index}/{n} starts at input {info['first_input']}, expected "
                              f"{expected_start}")
        expected_start = info["end_input"]
    if expected_start != first["inputs"]:
        raise ConfigError(f"the parts cover inputs 0..{expected_start}, the listing holds {first['inputs']}")
    return parts


class _Replay:
    """Global dedup over the parts' stored records, in order; builds the merged shard list."""

    def __init__(self, distance: int, expected: int):
        self.dedup = NearDuplicateIndex(distance, expected=max(expected, 1))
        self.packed = 0
        self.duplicates: list[dict[str, str]] = []
        self.duplicate_count = 0
        self.removed = 0
        """Records their part kept that an earlier part's record duplicates."""
        self.restored = 0
        """Records their part dropped that the global order keeps."""
        self.shards: list[ShardInfo] = []

    def shard(self, part: _Part, entry: dict[str, Any]) -> None:
        index, problems = check_shard(part.path, entry)
        if problems:
            raise ShardFormatError(problems[0].describe(where=f"{part.path}/{entry['name']}",
                                                        exclude=entry.get("exclude", ())))
        assert index is not None
        local_drop = set(entry.get("exclude", ()))
        exclude: list[int] = []
        sources: np.ndarray | None = None
        # Part 0 is a prefix of the global order: its own dedup took the global decisions
        # already, so its kept hashes are only added, not queried.
        prefix = part.index == 0
        for j, h in enumerate(index.arrays["phash"].tolist()):
            if prefix and j not in local_drop:
                self.dedup.keep(h)
                self.packed += 1
                continue
            if not prefix and self.dedup.offer(h):
                self.packed += 1
                self.restored += j in local_drop
                continue
            exclude.append(j)
            self.duplicate_count += 1
            self.removed += j not in local_drop
            if len(self.duplicates) < SAMPLES_PER_REASON:
                if sources is None:
                    sources = np.asarray(index.group["source"][:], dtype=object)
                self.duplicates.append({"source": str(sources[j])})
        stored = stored_count(entry)
        if len(exclude) < stored:
            self.shards.append(ShardInfo(f"{part.path.name}/{entry['name']}", stored - len(exclude), entry["bytes"],
                                         entry["index_sha256"], tuple(exclude)))


def _merged_stats(parts: list[_Part], replay: _Replay) -> dict[str, Any]:
    """The single-node stats: sums over the parts, except dedup, which is the replay's; the
    sample lists are the parts' in order, cut at the single-node limit."""
    stats = [p.manifest["stats"] for p in parts]
    ignored = {s["ignored_files"] for s in stats}
    if len(ignored) != 1:
        raise ConfigError(f"the parts list different input files (ignored files: {sorted(ignored)}); every "
                          "part must see the same inputs")
    skipped = {r: 0 for r in REPORTED_REASONS}
    samples: dict[str, list[dict[str, str]]] = {}
    for s in stats:
        for reason, count in s["skipped"].items():
            if reason != "duplicate":
                skipped[reason] = skipped.get(reason, 0) + count
        for reason, rows in s["skipped_samples"].items():
            if reason != "duplicate":
                bucket = samples.setdefault(reason, [])
                bucket += rows[:SAMPLES_PER_REASON - len(bucket)]
    skipped["duplicate"] = replay.duplicate_count
    if replay.duplicates:
        samples["duplicate"] = replay.duplicates
    return {
        "inputs": sum(s["inputs"] for s in stats),
        "packed": replay.packed,
        "sliced": sum(s["sliced"] for s in stats),
        "passthrough": sum(s["passthrough"] for s in stats),
        "skipped": dict(sorted(skipped.items())),
        "skipped_samples": dict(sorted(samples.items())),
        "ignored_files": ignored.pop(),
    }


def _part_summary(part: _Part) -> dict[str, Any]:
    s = part.manifest["stats"]
    return {"part": part.label, "dir": part.path.name, "inputs": s["inputs"], "packed": s["packed"],
            "skipped": s["skipped"], "shards": len(part.manifest["shards"])}


def merge(cfg: MergeConfig) -> dict[str, Any]:
    """Merge the finished parts in ``cfg.out`` (see the module docstring); return the report.

    Raises :class:`RunError` when a part is missing, unfinished or running (after
    ``cfg.wait`` seconds) or another merge or pack holds ``cfg.out``, :class:`ConfigError`
    when the parts do not belong together or ``cfg.out`` holds a single-node dataset,
    :class:`ShardFormatError` when a part's shard fails its checks.
    """
    t0 = time.monotonic()
    root = Path(cfg.out)
    if cfg.wait < 0:
        raise ConfigError(f"--wait must be >= 0 seconds, got {cfg.wait}")
    if not root.is_dir():
        raise ConfigError(f"merge: {root} is not a directory")
    check_writable_dir(root, "merge DIR")
    with DirLock(root, "smae-pack merge"):
        previous = None
        if (root / MANIFEST_NAME).is_file():
            previous = (root / MANIFEST_NAME).read_text(encoding="utf-8")
            if read_manifest(root).get("params", {}).get("tool") != MERGE_TOOL:
                raise ConfigError(f"{root} holds a single-node dataset ({MANIFEST_NAME} written by smae-pack); "
                                  "merge writes its manifest into a directory of parts only")
        n, locks = _wait_for_parts(root, cfg.wait)
        try:
            parts = _read_parts(root, n)
            params0 = parts[0].manifest["params"]
            entries = [(part, e) for part in parts for e in part.manifest["shards"]]
            replay = _Replay(int(params0["dedup_distance"]), sum(stored_count(e) for _p, e in entries))
            for part, entry in tqdm(entries, unit="shard", disable=not cfg.progress, desc="smae-pack merge",
                                    mininterval=0.5, dynamic_ncols=True):
                replay.shard(part, entry)
            stats = _merged_stats(parts, replay)
            if not replay.shards:
                reasons = ", ".join(f"{k}={v}" for k, v in stats["skipped"].items() if v)
                raise DataError(f"no records: every one of the {stats['inputs']} input(s) was skipped "
                                f"({reasons}); no dataset was written")
            params = {k: v for k, v in params0.items() if k not in ("part", "fingerprint", "batch_size")}
            params.update({"tool": MERGE_TOOL, "parts": n, "plan": params0["part"]["plan"],
                           "part_fingerprints": [p.manifest["params"]["fingerprint"] for p in parts]})
            path = write_manifest(root, replay.shards, params, stats)
        finally:
            for lock in locks:
                lock.release()
    state = "already merged, unchanged" if previous == path.read_text(encoding="utf-8") else "merged"
    doc = dict(stats)
    doc.update({
        "out": str(root), "shards": len(replay.shards), "parts": [_part_summary(p) for p in parts],
        "across_parts": {"removed": replay.removed, "restored": replay.restored},
        "seconds": round(time.monotonic() - t0, 3), "run": state,
    })
    return doc


def format_merge_summary(doc: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k}={v}" for k, v in doc["skipped"].items() if v) or "none"
    lines = [f"smae-pack merge: {doc['packed']} records from {doc['inputs']} inputs in {len(doc['parts'])} part(s), "
             f"{doc['shards']} shard(s), in {doc['seconds']:.1f} s ({doc['run']})",
             f"  skipped: {skipped}",
             f"  near-duplicates across parts: {doc['across_parts']['removed']} removed, "
             f"{doc['across_parts']['restored']} restored (dropped by their part, kept in the global order)"]
    lines += [f"  part {p['part']}: packed {p['packed']} of {p['inputs']} inputs, "
              f"duplicate={p['skipped'].get('duplicate', 0)}" for p in doc["parts"][:20]]
    lines.append(f"  output: {doc['out']}")
    return "\n".join(lines)
