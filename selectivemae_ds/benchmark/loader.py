"""`smae-bench loader`: the DALI input pipeline vs the public code's loader, same records, same run.

The baseline is the public SelectiveMAE/MAE loader path: PIL decode of the whole image,
torchvision ``RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=bicubic)``,
``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in a ``torch.utils.data.DataLoader``
with the same worker count, reading the same shard records through ``ShardedDataset``.

Prints one JSON line. Throughput counts images delivered to the training device after
``--warmup`` batches (pipeline start-up and worker spawn are excluded for both loaders).
``cpu_ms_per_img`` is the CPU time of the loader's whole process tree per image over
the same window: the number to compare on a machine shared with other jobs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selectivemae_ds.data.config import DataConfig
from selectivemae_ds.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, InputPipeline
from selectivemae_ds.data.shards import ShardedDataset
from selectivemae_ds.errors import ConfigError, run_cli


class ReferenceDataset(torch.utils.data.Dataset):
    """The public code's per-sample path over shard records: bytes -> PIL -> (3, S, S) float32."""

    def __init__(self, root: str, img_size: int):
        from torchvision import transforms

        self.records = ShardedDataset(root)
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        img = Image.open(io.BytesIO(self.records.read(i))).convert("RGB")
        return self.transform(img)


def _process_tree_cpu_seconds() -> float | None:
    """user+system CPU seconds of this process and all its live descendants (Linux /proc), else None.

    On a machine shared with other jobs wall-clock img/s swings with their load; CPU
    time per image of the loader's own processes (main, DALI/DataLoader workers,
    decode threads) does not, so both are reported.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return None
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process ended (or is not ours to read) between listing and reading
        fields = text[text.rindex(")") + 2:].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def _timed(batches: Any, steps: int, warmup: int, device: torch.device) -> tuple[float, int, float | None]:
    """Pull ``warmup`` then ``steps`` batches; returns (seconds, images, CPU seconds) of the timed steps."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images = 0
    cpu0 = _process_tree_cpu_seconds()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        if batch.device != device:
            batch = batch.to(device, non_blocking=True)
        images += batch.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync on purpose: the clock must see finished work
    seconds = time.perf_counter() - start
    cpu1 = _process_tree_cpu_seconds()
    return seconds, images, None if cpu0 is None or cpu1 is None else cpu1 - cpu0


def _endless(loader: torch.utils.data.DataLoader) -> Any:
    while True:
        yield from loader


def run_dali(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = DataConfig(path=args.data, img_size=args.img_size, workers=args.workers, prefetch=args.prefetch,
                     decode_threads=args.decode_threads or args.workers, hw_decoder_load=args.hw_decoder_load,
                     device="gpu" if device.type == "cuda" else "cpu", dtype=args.dtype)
    with InputPipeline(cfg, seed=args.seed, global_batch=args.batch, micro_batch=args.batch, rank=0,
                       world_size=1, device=device) as pipe:
        seconds, images, cpu = _timed(pipe, args.steps, args.warmup, device)
        decode_device, substituted = pipe.decode_device, pipe.substituted
    return {"img_per_s": images / seconds, "seconds": seconds, "images": images, "cpu": cpu,
            "decode_device": decode_device, "decode_threads": cfg.decode_threads, "substituted": substituted}


def run_baseline(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dataset = ReferenceDataset(args.data, args.img_size)
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    seconds, images, cpu = _timed(_endless(loader), args.steps, args.warmup, device)
    return {"img_per_s": images / seconds, "seconds": seconds, "images": images, "cpu": cpu}


def _per_img_ms(result: dict[str, Any]) -> float | None:
    return None if result["cpu"] is None else round(1e3 * result["cpu"] / result["images"], 2)


def _dali_version() -> str:
    import nvidia.dali

    return str(nvidia.dali.__version__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smae-bench loader", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="packed dataset directory (manifest.json + shard-*.zarr)")
    p.add_argument("--batch", type=int, default=64, help="images per batch (one rank, no accumulation)")
    p.add_argument("--steps", type=int, default=30, help="timed batches per loader")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before the clock starts")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="training device; cuda decodes with nvJPEG (DALI mixed)")
    p.add_argument("--workers", type=int, default=4,
                   help="DALI external_source workers and DataLoader workers (the same count)")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="DALI num_threads; 0 = the same as --workers")
    p.add_argument("--prefetch", type=int, default=2, help="DALI prefetch queue depth (batches)")
    p.add_argument("--img-size", type=int, default=224, help="output side in pixels")
    p.add_argument("--hw-decoder-load", type=float, default=0.65, help="share of JPEGs for the hardware decoder")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="DALI output dtype")
    p.add_argument("--seed", type=int, default=0, help="order/augmentation seed for both loaders")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the reference loader (baseline_img_per_s is then null)")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    records = ShardedDataset(args.data)
    shapes = np.asarray([records.shape(i) for i in range(len(records))], dtype=np.float64)
    dali = run_dali(args, device)
    baseline = None if args.no_baseline else run_baseline(args, device)
    result = {
        "mode": "loader",
        "img_per_s": round(dali["img_per_s"], 1),
        "baseline_img_per_s": None if baseline is None else round(baseline["img_per_s"], 1),
        "speedup": None if baseline is None else round(dali["img_per_s"] / baseline["img_per_s"], 2),
        "cpu_ms_per_img": _per_img_ms(dali),
        "baseline_cpu_ms_per_img": None if baseline is None else _per_img_ms(baseline),
        "device": args.device,
        "decode_device": dali["decode_device"],
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "decode_threads": dali["decode_threads"],
        "prefetch": args.prefetch,
        "img_size": args.img_size,
        "dtype": args.dtype,
        "records": len(records),
        "mean_stored_hw": [round(float(v), 1) for v in shapes.mean(axis=0)],
        "substituted": dali["substituted"],
        "dali_seconds": round(dali["seconds"], 3),
        "baseline_seconds": None if baseline is None else round(baseline["seconds"], 3),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "dali": _dali_version(),
        "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``smae-bench loader``; exit codes from :mod:`selectivemae_ds.errors`."""
    return run_cli(_main, argv)
