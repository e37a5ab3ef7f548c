"""Benchmark smae-pack against a naive serial Pillow baseline; prints one JSON object.

Input: ``--count`` JPEG crops (``--side`` px squares, quality 90, seeded positions) cut
from the bundled real NEON scenes in ``assets/neon`` (the two large JPEG orthophotos and
the drone photo), written to a temporary directory. Crops are within ``--max-side``, so
smae-pack stores them byte-for-byte; the run still decodes each (at 1/8 scale) to prove
it is whole and to hash it, deduplicates (on, default distance) and writes shards.

Both sides run in the same process, on the same files, ``--repeat`` times each; the
best time counts (the machine may be shared: the best run is the least disturbed one):

- ``smae_pack``: :func:`data_prep.pack.pack` with ``--workers`` processes
  (1 = inline, exactly one core), a fresh output directory per repeat;
- ``naive``: one process, per image ``Image.open -> convert("RGB") -> save JPEG q95``
  (writes nothing to disk, hashes nothing);
- ``smae_transform_only``: smae-pack's per-image function alone, serially, on the same
  files: the like-for-like comparison with ``naive`` (the full run adds the work
  directory, dedup and the fsynced shard write).

Images/s per core = images / seconds / workers (the naive side uses one core).

Usage: ``.venv/bin/python bench/pack.py [--count 300] [--side 512] [--workers 1] [--repeat 3]``
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.images import PackOptions, process_image  # noqa: E402
from data_prep.pack import DEFAULT_DEDUP_DISTANCE, PackConfig, pack  # noqa: E402

SCENES = (
    "2019_YELL_2_528000_4978000_image_crop2_1536.jpg",
    "2019_YELL_2_541000_4977000_image_crop.jpg",
    "AWPE Pigeon Lake 2020 DJI_0005.JPG",
)


def make_inputs(dest: Path, count: int, side: int, seed: int) -> list[Path]:
    """``count`` seeded JPEG crops of the bundled scenes, round-robin over scenes."""
    rng = random.Random(seed)
    scenes = []
    for name in SCENES:
        with Image.open(REPO / "assets" / "neon" / name) as im:
            scenes.append(im.convert("RGB"))
    paths = []
    for i in range(count):
        scene = scenes[i % len(scenes)]
        w, h = scene.size
        x, y = rng.randrange(0, w - side + 1), rng.randrange(0, h - side + 1)
        path = dest / f"crop-{i:05d}.jpg"
        scene.crop((x, y, x + side, y + side)).save(path, quality=90)
        paths.append(path)
    return paths


def naive(paths: list[Path]) -> float:
    """Seconds for open -> RGB -> JPEG q95 of every file, serially."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=95)
    return time.perf_counter() - t0


def transform_only(paths: list[Path]) -> float:
    """Seconds for smae-pack's per-image work alone (read, decode/verify, convert or pass
    through, pHash), serially: the like-for-like counterpart of :func:`naive`."""
    opts = PackOptions()
    t0 = time.perf_counter()
    for p in paths:
        process_image(p.read_bytes(), p.name, opts)
    return time.perf_counter() - t0


def smae(src: Path, out_root: Path, workers: int, rep: int) -> tuple[float, dict]:
    out = out_root / f"run-{rep}"
    t0 = time.perf_counter()
    doc = pack(PackConfig(sources=[str(src)], out=out, workers=workers, progress=False))
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds, doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300, help="number of JPEG crops (default %(default)s)")
    ap.add_argument("--side", type=int, default=512, help="crop side in px (default %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="smae-pack worker processes (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the best counts (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="crop positions seed (default %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="smae-bench-pack-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        paths = make_inputs(src, args.count, args.side, args.seed)
        input_bytes = sum(p.stat().st_size for p in paths)
        smae_runs, naive_runs, transform_runs, doc = [], [], [], {}
        for rep in range(args.repeat):
            seconds, doc = smae(src, Path(tmp), args.workers, rep)
            smae_runs.append(seconds)
            naive_runs.append(naive(paths))
            transform_runs.append(transform_only(paths))
    n = args.count
    smae_best, naive_best = min(smae_runs), min(naive_runs)
    smae_per_core = n / smae_best / args.workers
    naive_per_core = n / naive_best
    print(json.dumps({
        "benchmark": "smae-pack vs naive serial Pillow",
        "input": {"images": n, "side": args.side, "format": "JPEG q90 crops of assets/neon scenes",
                  "bytes": input_bytes, "seed": args.seed},
        "smae_pack": {"workers": args.workers, "dedup_distance": DEFAULT_DEDUP_DISTANCE,
                      "seconds_runs": [round(s, 3) for s in smae_runs],
                      "images_per_s": round(n / smae_best, 1), "images_per_s_per_core": round(smae_per_core, 1),
                      "packed": doc.get("packed"), "passthrough": doc.get("passthrough"),
                      "skipped": {k: v for k, v in doc.get("skipped", {}).items() if v}},
        "naive_serial": {"seconds_runs": [round(s, 3) for s in naive_runs],
                         "images_per_s_per_core": round(naive_per_core, 1)},
        "ratio_per_core": round(smae_per_core / naive_per_core, 2),
        "smae_transform_only": {"seconds_runs": [round(s, 3) for s in transform_runs],
                                "images_per_s_per_core": round(n / min(transform_runs), 1),
                                "ratio_vs_naive": round(naive_best / min(transform_runs), 2)},
        "target_images_per_s_per_core": 50,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }, indent=2))


if __name__ == "__main__":
    main()
