"""Pack the bundled NEON images into a benchmark dataset (once) and run `smae-bench loader` on it.

    .venv/bin/python bench/loader.py --pack-dir /tmp/smae-bench-neon [smae-bench loader options]

The dataset is ``--count`` random crops (default 256-512 px a side) of the real aerial images
in assets/neon, JPEG quality 90 (selectivemae_ds.data.crops builds it; seeded, so every
machine benchmarks the same bytes). ``--data`` is filled in from ``--pack-dir``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selectivemae_ds.benchmark import loader  # noqa: E402
from selectivemae_ds.data.crops import build_crop_dataset  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pack-dir", required=True, help="where the benchmark dataset is (or will be) packed")
    p.add_argument("--count", type=int, default=256, help="records to pack")
    p.add_argument("--min-side", type=int, default=256, help="smallest crop side in pixels")
    p.add_argument("--max-side", type=int, default=512, help="largest crop side (capped by each image's size)")
    ours, rest = p.parse_known_args(argv)
    root = Path(ours.pack_dir)
    if not (root / "manifest.json").is_file():
        build_crop_dataset(root, REPO / "assets" / "neon", count=ours.count, shards=2,
                      min_side=ours.min_side, max_side=ours.max_side)
    return loader.main(["--data", str(root), *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
