"""Record reads from a packed dataset: the direct path (pread through the checked sharding
index) vs zarr-python's array API, on the same records in one run; prints one JSON object.

    .venv/bin/python bench/shard_read.py --work /tmp/shard_read [--count 256] [--rounds 5]

The dataset is `--count` real JPEG crops (96-200 px a side) of the bundled NEON images,
written by selectivemae_ds.data.crops.build_crop_dataset (seeded).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selectivemae_ds.data.crops import build_crop_dataset  # noqa: E402
from selectivemae_ds.data.shards import ShardedDataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the benchmark dataset is (or will be) built")
    ap.add_argument("--count", type=int, default=256, help="records (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="passes over all records per side (default 5)")
    args = ap.parse_args(argv)
    root = args.work / "data"
    if not (root / "manifest.json").is_file():
        build_crop_dataset(root, REPO / "assets" / "neon", count=args.count, shards=2)
    ds = ShardedDataset(root)
    n = len(ds)
    spans = []
    for i in range(n):
        s, j = ds.locate(i)
        sh = ds.shard(s)
        spans.append((sh, int(sh.offsets[j]), int(sh.offsets[j + 1])))
    if any(sh.direct is None for sh, _a, _b in spans):
        raise SystemExit("the direct read path is not available for this dataset")

    def timed(read) -> float:
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            for sh, a, b in spans:
                read(sh, a, b)
        return (time.perf_counter() - t0) / (args.rounds * n)

    same = all(sh.direct.read(a, b) == sh.heap[a:b].tobytes() for sh, a, b in spans)
    direct = timed(lambda sh, a, b: sh.direct.read(a, b))
    via_zarr = timed(lambda sh, a, b: sh.heap[a:b].tobytes())
    print(json.dumps({"records": n, "rounds": args.rounds, "identical_bytes": same,
                      "direct_ms_per_read": round(direct * 1e3, 4), "zarr_ms_per_read": round(via_zarr * 1e3, 4),
                      "speedup": round(via_zarr / direct, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
