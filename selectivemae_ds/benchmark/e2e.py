"""`smae-bench e2e`: training steps end to end, packed shards -> InputPipeline -> DeepSpeed engine.

Runs the trainer's own code path in a world of one (no launcher needed): the config
loader with ``--set`` overrides, ``merge_ds_config``, ``setup_distributed``, the
``Trainer`` (its ``InputPipeline``: nvJPEG "mixed" decode on CUDA, the CPU path
otherwise) and ``Trainer.train_step``, which does the micro-batch loop, the ZeRO
backward/step and the one host sync per optimizer step. Nothing is checkpointed.

Prints one JSON line (the last line of stdout; the trainer's own lines go to stderr):
``img_per_s`` over the timed steps (after ``--warmup`` untimed ones),
``data_wait_fraction`` (time blocked in ``next(pipeline)`` over step time),
``peak_mem_gb`` (torch's CUDA max allocated over the whole run, null on CPU; DALI's own
GPU pools are outside torch's allocator, so ``device_used_gb`` adds the whole device's
memory in use at the end of the run), ``mfu``
(null on CPU or an unknown GPU), the device name and package versions.

``--deepspeed-config`` takes a path or the name of one of the project's DeepSpeed JSONs
(``zero1``, ``zero2``, ``zero3``, ``cpu_smoke``: the repository's ``ds_configs/``, which
the wheel ships as package data in ``selectivemae_ds/ds_configs``), so the default works
from an installed wheel as well as from a checkout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from selectivemae_ds.benchmark.model import device_name, peak_mem_gb, versions
from selectivemae_ds.errors import ConfigError, run_cli

# Runs this many times longer than the benchmark, so the PSTS progress t = step / total
# moves by at most 1% of a run while it is timed.
PROGRESS_STRETCH = 100


def device_used_gb(device: torch.device) -> float | None:
    """Memory in use on the whole GPU now (torch, DALI, CUDA contexts), GB = 1e9 bytes; None on CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return round((total - free) / 1e9, 3)


def bundled_ds_config_dir() -> Path:
    """The directory of the project's DeepSpeed JSONs: the package data of an installed wheel
    (``selectivemae_ds/ds_configs``), else the source checkout's ``ds_configs/``."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "ds_configs", package.parent / "ds_configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no bundled DeepSpeed configs beside {package} (a broken install?); "
                      "pass --deepspeed-config PATH")


def resolve_ds_config(value: str | Path) -> Path:
    """``--deepspeed-config``: an existing file as given, else a bundled config by name (``zero2``
    or ``zero2.json``); ConfigError naming the value and the bundled names otherwise."""
    path = Path(value)
    if path.is_file():
        return path
    if path.name == str(value):
        root = bundled_ds_config_dir()
        bundled = root / (path.name if path.suffix == ".json" else path.name + ".json")
        if bundled.is_file():
            return bundled
        names = ", ".join(sorted(p.stem for p in root.glob("*.json")))
        raise ConfigError(f"--deepspeed-config {value}: no such file, nor a bundled config ({names})")
    raise ConfigError(f"--deepspeed-config {value}: no such file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smae-bench e2e", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="packed dataset directory (manifest.json + shard-*.zarr)")
    p.add_argument("--config", type=Path, default=None,
                   help="experiment TOML to start from (configs/*.toml); the options below override it")
    p.add_argument("--method", default=None, help="model.method (default: the config's, else selectivemae)")
    p.add_argument("--size", default=None, help="model.size (default: the config's, else base)")
    p.add_argument("--img-size", type=int, default=None, help="model.img_size (default: the config's, else 224)")
    p.add_argument("--batch", type=int, default=None,
                   help="train.global_batch, images per optimizer step (default: the config's, else 1024)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="train.micro_batch, images per forward/backward (default: --batch, i.e. no accumulation)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the clock starts")
    p.add_argument("--deepspeed-config", default="zero2",
                   help="DeepSpeed JSON (ZeRO stage, bf16, buckets): a path, or the name of a bundled one "
                        "(zero1, zero2, zero3, cpu_smoke)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--workers", type=int, default=None, help="data.workers (DALI source processes)")
    p.add_argument("--decode-threads", type=int, default=None, help="data.decode_threads (DALI num_threads)")
    p.add_argument("--prefetch", type=int, default=None, help="data.prefetch (DALI queue depth in batches)")
    p.add_argument("--progress", type=float, default=0.5,
                   help="training progress t in [0, 0.99] the steps run at (PSTS stage; 0.5 = far)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="train.peak_tflops for MFU; 0 = from the device name (null when unknown)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. --set model.decoder_depth=8 (repeatable, applied last)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where the trainer writes its resolved config and metrics (default: a temporary "
                        "directory, removed afterwards)")
    return p


def overrides_for(args: argparse.Namespace, run_dir: Path, device: str, bf16: bool, total: int) -> list[str]:
    """The ``--set`` list that turns the experiment config into this benchmark run."""
    # Counted in steps, always from scratch (a config's epochs and resume = "auto" do not apply).
    out = [f"run_dir={run_dir}", f"data.path={args.data}", f"train.steps={total}", "train.epochs=0",
           "checkpoint.resume=", "train.picture_every=0", "checkpoint.every_steps=0", "optim.warmup_steps=0",
           f"train.peak_tflops={args.peak_tflops}",
           # Mixed (nvJPEG) decode feeds a GPU; a CPU run takes the CPU path.
           f"data.device={'gpu' if device == 'cuda' else 'cpu'}",
           # The engine casts to its own dtype anyway; delivering bf16 halves the copy.
           f"data.dtype={'bfloat16' if bf16 else 'float32'}"]
    optional = {"model.method": args.method, "model.size": args.size, "model.img_size": args.img_size,
                "train.global_batch": args.batch, "data.workers": args.workers,
                "data.decode_threads": args.decode_threads, "data.prefetch": args.prefetch}
    micro = args.micro_batch if args.micro_batch is not None else args.batch
    optional["train.micro_batch"] = micro
    out += [f"{key}={value}" for key, value in optional.items() if value is not None]
    return out + list(args.set)


def _check(args: argparse.Namespace) -> None:
    """ConfigError for a usage error in the numeric options."""
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    if not 0.0 <= args.progress <= 0.99:
        raise ConfigError("--progress must be in [0, 0.99]")
    for name in ("batch", "micro_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


def run(args: argparse.Namespace, device: str, run_dir: Path) -> dict[str, Any]:
    """Build the trainer, run warmup + timed steps, return the record."""
    from selectivemae_ds.config import load_config
    from selectivemae_ds.engine import load_ds_json
    from selectivemae_ds.metrics import mfu, peak_tflops
    from selectivemae_ds.trainer import Trainer

    length = args.warmup + args.steps
    total = PROGRESS_STRETCH * length
    # Both raise ConfigError naming the file or key; run_cli reports it.
    ds_json = load_ds_json(args.deepspeed_config)
    bf16 = bool(ds_json.get("bf16", {}).get("enabled", False))
    cfg = load_config(args.config, overrides_for(args, run_dir, device, bf16, total))
    # The trainer prints its start line and DeepSpeed its banners; stdout carries only our JSON.
    with contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(cfg, ds_json, str(args.deepspeed_config))
        try:
            # Start where t = step / total equals --progress: the PSTS stage of a real run there.
            trainer.step = min(round(args.progress * total), total - length)
            progress = (trainer.step + args.warmup) / total
            for _ in range(args.warmup):
                trainer.train_step()
                trainer.step += 1
            step_s: list[float] = []
            wait_s: list[float] = []
            losses: list[float] = []
            applied = 0
            logged: dict[str, float] = {}
            for _ in range(args.steps):
                t0 = time.perf_counter()
                # train_step ends in the host sync of the all-reduced loss: the step is finished here.
                loss, logged, ok, waited, _last, _stop = trainer.train_step()
                step_s.append(time.perf_counter() - t0)
                wait_s.append(waited)
                losses.append(loss)
                applied += int(ok)
                trainer.step += 1
            tcfg = trainer.cfg
            seconds = sum(step_s)
            img_s = tcfg.train.global_batch * args.steps / seconds
            peak = peak_tflops(trainer.device, tcfg.train.peak_tflops)
            util = mfu(img_s, trainer.flops_per_image, trainer.world, peak)
            record = {
                "mode": "e2e",
                "method": tcfg.model.method,
                "size": tcfg.model.size,
                "img_size": tcfg.model.img_size,
                "batch": tcfg.train.global_batch,
                "micro_batch": tcfg.train.micro_batch,
                "accum": trainer.accum,
                "steps": args.steps,
                "warmup": args.warmup,
                "img_per_s": round(img_s, 3),
                "step_ms": round(1e3 * seconds / args.steps, 2),
                "step_ms_min": round(1e3 * min(step_s), 2),
                "step_ms_max": round(1e3 * max(step_s), 2),
                "data_wait_fraction": round(sum(wait_s) / seconds, 4),
                "peak_mem_gb": peak_mem_gb(trainer.device),
                "device_used_gb": device_used_gb(trainer.device),
                "mfu": None if util is None else round(util, 4),
                "peak_tflops": peak,
                "flops_per_img": trainer.flops_per_image,
                "achieved_tflops": round(img_s * trainer.flops_per_image / 1e12, 4),
                "loss_finite": all(math.isfinite(x) for x in losses),
                "steps_applied": applied,
                **logged,  # the method's logged values of the last step (e.g. psts_stage_id)
                "progress": round(progress, 4),
                "device": device_name(trainer.device),
                "device_type": trainer.device.type,
                "world_size": trainer.world,
                "deepspeed_config": str(args.deepspeed_config),
                "zero_stage": int(ds_json.get("zero_optimization", {}).get("stage", 0)),
                "bf16": bf16,
                "decode_device": trainer.pipeline.decode_device,
                "data_workers": tcfg.data.workers,
                "decode_threads": tcfg.data.decode_threads,
                "records": trainer.pipeline.dataset_len,
                "substituted": trainer.pipeline.substituted,
                "versions": versions(),
            }
        finally:
            trainer.close()
    return record


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    args.deepspeed_config = resolve_ds_config(args.deepspeed_config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    # DeepSpeed picks its accelerator once, at first use: make it the one asked for.
    os.environ["DS_ACCELERATOR"] = device
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="smae-bench-e2e-"))
    try:
        record = run(args, device, run_dir)
    finally:
        if args.run_dir is None:
            shutil.rmtree(run_dir)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(json.dumps(record), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``smae-bench e2e``; exit codes from :mod:`selectivemae_ds.errors`."""
    return run_cli(_main, argv)
