"""Cost of ``smae-pack merge`` at a size no test packs; prints one JSON object.

The merge never reads a record's bytes: per shard it validates the index arrays against
the part's manifest (``shards.check_shard``: Zarr open, 5 arrays, sha256 digest) and replays
dedup over the stored hashes in the global order. So its cost depends on the number of
records and shards, not on image sizes, and synthetic parts measure it: ``--parts`` part
directories of ``--records`` records in total, ``--per-shard`` records per shard, every
record the same tiny JPEG with a seeded random 64-bit hash, and, from part 1 on, one record
in ``--dup-every`` a copy of an earlier part's record's hash (cross-part duplicates the merge
must exclude; a part holds no duplicate of its own, as after its own dedup). Part manifests are written as ``smae-pack --part``
writes them. The time is :func:`data_prep.merge.merge` alone (best of ``--repeat``), wall clock and this
process's CPU time (the merge is one thread; on a shared machine the CPU time is the
number to trust); ``peak_rss_mb`` is
the process's peak (build included; the dedup index is the merge's main memory cost).

Usage: ``.venv/bin/python bench/merge.py [--records 200000] [--parts 4] [--per-shard 4096]``
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.merge import MergeConfig, merge  # noqa: E402
from data_prep.pack import REPORTED_REASONS  # noqa: E402
from data_prep.parts import part_dir, share_bounds  # noqa: E402
from selectivemae_ds.data.shards import ShardWriter, shard_name, write_manifest  # noqa: E402


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 60)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build(root: Path, records: int, parts: int, per_shard: int, dup_every: int, seed: int) -> int:
    """Write the synthetic parts; return how many planted duplicates they hold."""
    rng = random.Random(seed)
    data = _tiny_jpeg()
    hashes: list[int] = []
    planted = 0
    for i in range(parts):
        lo, hi = share_bounds(records, i, parts)
        earlier = len(hashes)  # planted copies come from earlier parts: no part has a duplicate of its own
        out = part_dir(root, i, parts)
        shards = []
        for k, start in enumerate(range(lo, hi, per_shard)):
            writer = ShardWriter(out, shard_name(k))
            for g in range(start, min(hi, start + per_shard)):
                if earlier and g % dup_every == dup_every - 1:
                    h = hashes[rng.randrange(earlier)]
                    planted += 1
                else:
                    h = rng.getrandbits(64)
                hashes.append(h)
                writer.add(data, 64, 64, h, f"img{g:09d}.jpg")
            shards.append(writer.finalize())
        params = {"tool": "smae-pack", "inputs": records, "dedup_distance": 4, "fingerprint": f"synthetic-{i}",
                  "part": {"index": i, "of": parts, "first_input": lo, "end_input": hi, "plan": "synthetic"}}
        stats = {"inputs": hi - lo, "packed": hi - lo, "sliced": 0, "passthrough": hi - lo,
                 "skipped": {r: 0 for r in REPORTED_REASONS}, "skipped_samples": {}, "ignored_files": 0}
        write_manifest(out, shards, params, stats)
    return planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000, help="records over all parts (default %(default)s)")
    ap.add_argument("--parts", type=int, default=4, help="number of parts (default %(default)s)")
    ap.add_argument("--per-shard", type=int, default=4096, help="records per shard (default %(default)s)")
    ap.add_argument("--dup-every", type=int, default=50,
                    help="one record in N repeats an earlier record's hash (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=2, help="merge runs; the best counts (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="hash seed (default %(default)s)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.dir))
    try:
        t = time.monotonic()
        planted = build(root, args.records, args.parts, args.per_shard, args.dup_every, args.seed)
        build_s = time.monotonic() - t
        runs, cpu_runs, report = [], [], {}
        for _ in range(args.repeat):
            (root / "manifest.json").unlink(missing_ok=True)
            t, c = time.monotonic(), time.process_time()
            report = merge(MergeConfig(root, progress=False))
            runs.append(round(time.monotonic() - t, 3))
            cpu_runs.append(round(time.process_time() - c, 3))
        best, best_cpu = min(runs), min(cpu_runs)
        print(json.dumps({
            "benchmark": "smae-pack merge (synthetic parts)",
            "records": args.records, "parts": args.parts, "per_shard": args.per_shard,
            "shards": report["shards"], "planted_duplicates": planted,
            "duplicates_removed": report["skipped"]["duplicate"],
            "across_parts_removed": report["across_parts"]["removed"],
            "build_seconds": round(build_s, 1), "merge_seconds_runs": runs,
            "merge_cpu_seconds_runs": cpu_runs,
            "records_per_s": round(args.records / best), "us_per_record": round(best / args.records * 1e6, 2),
            "cpu_us_per_record": round(best_cpu / args.records * 1e6, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
