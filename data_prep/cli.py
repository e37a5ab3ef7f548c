"""Console entry point ``smae-pack`` (registered in setup.py).

Three forms::

    smae-pack SRC [SRC ...] --out DIR [--part I/N] [options]   pack images into schema-1 shards
                                                              (--part: one share of a multi-node pack)
    smae-pack merge DIR [--wait SECONDS]                      join the parts into one dataset
    smae-pack verify DIR                                      check a packed dataset

``verify`` and ``merge`` are recognised as the first argument only; a source directory
literally named so can be given as ``./verify``.

Exit status (the project's table, :mod:`selectivemae_ds.errors`): 0 success; 2 usage or
configuration error (bad flag, unusable ``--out``, ``--out`` holding other work); 3 data
error (no inputs, every input skipped, ``verify`` found problems); 5 the run had to stop
(``--out`` locked by another run, disk full, a worker killed: rerun the same command to
resume); 130 interrupted (rerun the same command to resume); 1 a bug (traceback).
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
    DEFAULT_DEDUP_DISTANCE, DEFAULT_IMAGES_PER_SHARD, PackConfig, format_summary, pack, write_report,
)
from data_prep.merge import MergeConfig, format_merge_summary, merge
from data_prep.parts import parse_part
from data_prep.verify import format_result, verify_dataset
from selectivemae_ds.data.store import is_remote
from selectivemae_ds.errors import EXIT_DATA, ConfigError, run_cli


def _location(text: str) -> Path | str:
    """A local directory (Path) or an object store URL such as s3://bucket/prefix (kept as text:
    Path would fold its '//')."""
    return text if is_remote(text) else Path(text)


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from e
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return value


def pack_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smae-pack",
        usage=("smae-pack SRC [SRC ...] --out DIR|s3://BUCKET/PREFIX [--part I/N] [options]\n"
               "       smae-pack merge DIR [--wait SECONDS]\n       smae-pack verify DIR|s3://BUCKET/PREFIX"),
        description=("Pack remote-sensing images (directories, zip and tar archives) into Zarr v3 "
                     "shards of JPEG records (schema 1) for SelectiveMAE-DS pretraining: convert to "
                     "RGB 8-bit, skip tiny images, slice large ones, remove near-duplicates, write "
                     "resumable, deterministic output."),
        epilog=("subcommands:\n  smae-pack merge DIR    join the parts of a multi-node pack (--part) into one "
                "dataset (see 'smae-pack merge --help').\n"
                "  smae-pack verify DIR   check manifest, schema, offsets, checksums and "
                "that every record decodes (see 'smae-pack verify --help').\n\n"
                "Interrupted runs resume: rerun the same command. Guide: docs/pack.md."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="input directory (recursive), zip or tar archive (.tar, .tar.gz, .tgz, .tar.bz2, "
                        ".tar.xz) or image file; order matters: it is the record order")
    p.add_argument("--out", required=True, type=_location, metavar="DIR",
                   help="output dataset directory (created; holds manifest.json and shard-NNNNN.zarr), or an "
                        "object store URL (s3://bucket/prefix; credentials and endpoint from AWS_* environment "
                        "variables): shards are uploaded as they are finalized, the manifest last")
    p.add_argument("--staging", type=Path, metavar="DIR",
                   help="with an object store --out: the local directory to pack in before uploading (needs "
                        "room for the work files and one shard; default: a directory under TMPDIR named after "
                        "--out, so a rerun resumes)")
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
    p.add_argument("--wait-lock", type=_seconds, default=0.0, metavar="SECONDS",
                   help="when another smae-pack run holds --out, wait up to SECONDS for it to finish "
                        "(default %(default)s: refuse at once, naming the holder)")
    p.add_argument("--part", metavar="I/N",
                   help="multi-node packing: pack only the I-th (0-based, e.g. $SLURM_ARRAY_TASK_ID or "
                        "$JOB_COMPLETION_INDEX) of N contiguous shares of the inputs into DIR/part-I-of-N; run "
                        "all N (at once, anywhere that sees the inputs), then 'smae-pack merge DIR'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smae-pack merge",
        description=("Join the parts of a multi-node pack (smae-pack ... --out DIR --part I/N) into one "
                     "dataset: refuses missing, unfinished or running parts (naming them), removes "
                     "near-duplicates across parts by the single-node rule (the first occurrence in the "
                     "input order wins) through per-shard exclusion lists, without rewriting any shard, and "
                     "writes DIR/manifest.json atomically. The result reads like a single-node pack."),
    )
    p.add_argument("dir", type=_location, metavar="DIR", help="the --out directory of the parts (holds part-I-of-N/)")
    p.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for missing, unfinished or running parts (default %(default)s: "
                        "refuse at once, naming them)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="write the merge summary as JSON (the single-node counts, each part's counts, and the "
                        "near-duplicates removed or restored across parts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smae-pack verify",
        description=("Check a packed dataset: manifest, schema version, index arrays and digests, "
                     "offsets, crc32 of every record, and that every record decodes as a JPEG of the "
                     "stored size. Exit 0 when sound; exit 3 listing each problem with its shard and "
                     "record (an empty dataset fails too)."),
    )
    p.add_argument("dir", type=_location, metavar="DIR",
                   help="dataset directory written by smae-pack, or its object store URL (s3://bucket/prefix)")
    return p


def _verify(argv: list[str]) -> int:
    args = verify_parser().parse_args(argv)
    res = verify_dataset(args.dir)
    print(format_result(args.dir, res), file=sys.stdout if res.ok else sys.stderr)
    return 0 if res.ok else EXIT_DATA


def _merge(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    if isinstance(args.dir, str):
        raise ConfigError(f"smae-pack merge: {args.dir} is an object store URL; merge the parts on the shared file "
                          "system they were packed to, then copy the dataset to the bucket (manifest.json last)")
    doc = merge(MergeConfig(out=args.dir, wait=args.wait, progress=not args.quiet))
    if args.report is not None:
        write_report(args.report, doc)
    print(format_merge_summary(doc))
    if args.report is not None:
        print(f"  report: {args.report}")
    return 0


def _pack(argv: list[str]) -> int:
    args = pack_parser().parse_args(argv)
    options = PackOptions(min_side=args.min_side, max_side=args.max_side, max_pixels=args.max_pixels,
                          jpeg_quality=args.jpeg_quality)
    cfg = PackConfig(sources=list(args.sources), out=args.out, workers=args.workers,
                     images_per_shard=args.images_per_shard, dedup_distance=args.dedup_distance,
                     options=options, restart=args.restart, progress=not args.quiet, wait_lock=args.wait_lock,
                     part=None if args.part is None else parse_part(args.part), staging=args.staging)
    try:
        doc = pack(cfg)
    except KeyboardInterrupt:
        print("smae-pack: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.report is not None:
        write_report(args.report, doc)
    print(format_summary(doc))
    if args.report is not None:
        print(f"  report: {args.report}")
    return 0


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return _verify(argv[1:])
    if argv and argv[0] == "merge":
        return _merge(argv[1:])
    return _pack(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (errors print ``<kind> error: <message>``)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
