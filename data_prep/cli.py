"""Console entry point ``smae-pack`` (registered in setup.py).

Two forms::

    smae-pack SRC [SRC ...] --out DIR [options]     pack images into schema-1 shards
    smae-pack verify DIR                            check a packed dataset

``verify`` is recognised as the first argument only; a source directory literally named
``verify`` can be given as ``./verify``.

Exit status: 0 success; 1 ``verify`` found problems; 2 usage error or a condition the
user must resolve (message says how); 130 interrupted (rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep.images import (
    DEFAULT_JPEG_QUALITY, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, DEFAULT_MIN_SIDE, PackOptions,
)
from data_prep.pack import (
    DEFAULT_DEDUP_DISTANCE, DEFAULT_IMAGES_PER_SHARD, PackConfig, PackError, format_summary, pack, write_report,
)
from data_prep.verify import format_result, verify_dataset


def _dedup_distance(text: str) -> int:
    if text.lower() in ("off", "none", "-1"):
        return -1
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an integer 0..32 or 'off', got {text!r}") from e
    if not 0 <= value <= 32:
        raise argparse.ArgumentTypeError(f"expected 0..32 or 'off', got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def pack_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smae-pack",
        usage="smae-pack SRC [SRC ...] --out DIR [options]\n       smae-pack verify DIR",
        description=("Pack remote-sensing images (directories, zip and tar archives) into Zarr v3 "
                     "shards of JPEG records (schema 1) for SelectiveMAE-DS pretraining: convert to "
                     "RGB 8-bit, skip tiny images, slice large ones, remove near-duplicates, write "
                     "resumable, deterministic output."),
        epilog=("subcommand:\n  smae-pack verify DIR   check manifest, schema, offsets, checksums and "
                "that every record decodes (see 'smae-pack verify --help').\n\n"
                "Interrupted runs resume: rerun the same command. Guide: docs/pack.md."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="input directory (recursive), zip or tar archive (.tar, .tar.gz, .tgz, .tar.bz2, "
                        ".tar.xz) or image file; order matters: it is the record order")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output dataset directory (created; holds manifest.json and shard-NNNNN.zarr)")
    p.add_argument("--workers", type=_positive, default=os.cpu_count() or 1, metavar="N",
                   help="worker processes (default: all %(default)s cores); the output does not depend on it")
    p.add_argument("--images-per-shard", type=_positive, default=DEFAULT_IMAGES_PER_SHARD, metavar="N",
                   help="records per shard (default %(default)s: ~0.5-1 GB shards of 1024 px JPEGs, few "
                        "files, little work lost on a kill)")
    p.add_argument("--min-side", type=_positive, default=DEFAULT_MIN_SIDE, metavar="PX",
                   help="skip images whose shorter side is below PX (default %(default)s); must be at most "
                        "half of --max-side so no tile is ever smaller")
    p.add_argument("--max-side", type=_positive, default=DEFAULT_MAX_SIDE, metavar="PX",
                   help="slice images whose longer side exceeds PX into a near-equal grid of tiles of at "
                        "most PX (default %(default)s)")
    p.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="decompression-bomb limit: skip images whose header declares more than N pixels, "
                        "before decoding (default %(default)s = 16384^2)")
    p.add_argument("--dedup-distance", type=_dedup_distance, default=DEFAULT_DEDUP_DISTANCE, metavar="D",
                   help="drop a record whose 64-bit perceptual hash is within D bits of an earlier kept one "
                        "(default %(default)s: catches re-encodes and format copies; 0 = identical hashes "
                        "only; 'off' disables)")
    p.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, metavar="Q",
                   help="JPEG quality for images that are re-encoded (default %(default)s); JPEG inputs "
                        "within limits are stored byte-for-byte")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="write the run summary as JSON (counts, skip reasons with sample paths, seconds)")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished or finished earlier run in --out instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smae-pack verify",
        description=("Check a packed dataset: manifest, schema version, index arrays and digests, "
                     "offsets, crc32 of every record, and that every record decodes as a JPEG of the "
                     "stored size. Exit 0 when sound; exit 1 listing each problem with its shard and "
                     "record."),
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="dataset directory written by smae-pack")
    return p


def _verify(argv: list[str]) -> int:
    args = verify_parser().parse_args(argv)
    res = verify_dataset(args.dir)
    print(format_result(args.dir, res), file=sys.stdout if res.ok else sys.stderr)
    return 0 if res.ok else 1


def _pack(argv: list[str]) -> int:
    args = pack_parser().parse_args(argv)
    try:
        options = PackOptions(min_side=args.min_side, max_side=args.max_side, max_pixels=args.max_pixels,
                              jpeg_quality=args.jpeg_quality)
    except ValueError as e:
        print(f"smae-pack: error: {e}", file=sys.stderr)
        return 2
    cfg = PackConfig(sources=list(args.sources), out=args.out, workers=args.workers,
                     images_per_shard=args.images_per_shard, dedup_distance=args.dedup_distance,
                     options=options, restart=args.restart, progress=not args.quiet)
    try:
        doc = pack(cfg)
    except PackError as e:
        print(f"smae-pack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smae-pack: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.report is not None:
        write_report(args.report, doc)
    print(format_summary(doc))
    if args.report is not None:
        print(f"  report: {args.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return _verify(argv[1:])
    return _pack(argv)


if __name__ == "__main__":
    sys.exit(main())
