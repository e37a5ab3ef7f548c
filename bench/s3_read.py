"""Records/s read from local disk vs from a local S3-compatible server (moto), one run; prints one JSON object.

    .venv/bin/python bench/s3_read.py --work /tmp/s3_read [--count 256] [--workers 2] [--batches 16]

The dataset is ``--count`` real JPEG crops (256-512 px a side) of the bundled NEON images
(selectivemae_ds.data.crops, seeded), uploaded object by object to a moto server started on
127.0.0.1 inside this process. Two measurements per side, same records in the same order:

* ``loader``: images/s delivered by the training input pipeline (InputPipeline, DALI, CPU
  decode, ``--workers`` source workers, ``--img-size``) after ``--warmup`` batches;
* ``reader``: records/s of ``ShardedDataset.read`` in this process, a second pass over every
  record (shards already open: the storage path alone, pread vs one ranged GET per record),
  and the same from S3 through a ``data.cache_dir`` filled by the first pass.

moto is a Python test server, not S3: its per-request cost is not a real store's, and it
runs as a thread of this process, taking CPU (and the GIL) from the loader's main process. The ratio says what the store seam costs here,
not what a cluster will see.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selectivemae_ds.data.config import DataConfig  # noqa: E402
from selectivemae_ds.data.crops import build_crop_dataset  # noqa: E402
from selectivemae_ds.data.pipeline import InputPipeline  # noqa: E402
from selectivemae_ds.data.shards import ShardedDataset  # noqa: E402
from selectivemae_ds.data.store import RemoteOptions, RemoteStore  # noqa: E402


def _loader_rate(path: str, args: argparse.Namespace) -> float:
    cfg = DataConfig(path=path, img_size=args.img_size, workers=args.workers, decode_threads=args.workers,
                     prefetch=2, device="cpu")
    with InputPipeline(cfg, seed=0, global_batch=args.batch, micro_batch=args.batch, rank=0, world_size=1) as pipe:
        for _ in range(args.warmup):
            next(pipe)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(pipe)
        return args.batches * args.batch / (time.perf_counter() - t0)


def _reader_rate(ds: ShardedDataset) -> float:
    """Records/s of a second pass over every record (the first opens the shards and fills a cache)."""
    for i in range(len(ds)):
        ds.read(i)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds.read(i)
    return len(ds) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the benchmark dataset is (or will be) built")
    ap.add_argument("--count", type=int, default=256, help="records (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="loader source workers and decode threads (default %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch = global batch (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="batches before timing (default %(default)s)")
    ap.add_argument("--batches", type=int, default=16, help="timed batches per side (default %(default)s)")
    ap.add_argument("--img-size", type=int, default=224, help="model input side (default %(default)s)")
    args = ap.parse_args(argv)
    from moto.server import ThreadedMotoServer
    import boto3

    root = args.work / "data"
    if not (root / "manifest.json").is_file():
        build_crop_dataset(root, REPO / "assets" / "neon", count=args.count, shards=2, min_side=256, max_side=512)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://{host}:{port}")
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="smae-bench")
        url = "s3://smae-bench/data"
        store = RemoteStore(url)
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                store.put(p.relative_to(root).as_posix(), p.read_bytes())
        local, remote = ShardedDataset(root), ShardedDataset(url)
        assert all(local.read(i) == remote.read(i) for i in range(len(local)))
        reader_local, reader_s3 = _reader_rate(ShardedDataset(root)), _reader_rate(ShardedDataset(url))
        with tempfile.TemporaryDirectory() as cache:
            reader_cached = _reader_rate(ShardedDataset(url, remote=RemoteOptions(cache_dir=cache,
                                                                                   cache_max_bytes=10**9)))
        loader_local, loader_s3 = _loader_rate(str(root), args), _loader_rate(url, args)
    finally:
        server.stop()
    print(json.dumps({
        "records": len(local), "heap_mb": round(sum(s["bytes"] for s in local.manifest["shards"]) / 1e6, 1),
        "workers": args.workers, "batch": args.batch, "timed_batches": args.batches, "img_size": args.img_size,
        "loader_local_img_s": round(loader_local, 1), "loader_s3_img_s": round(loader_s3, 1),
        "loader_s3_over_local": round(loader_s3 / loader_local, 3),
        "reader_local_rec_s": round(reader_local, 1), "reader_s3_rec_s": round(reader_s3, 1),
        "reader_s3_cached_rec_s": round(reader_cached, 1),
        "reader_s3_over_local": round(reader_s3 / reader_local, 4),
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
