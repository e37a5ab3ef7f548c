"""`smae-bench model`: fwd+bwd+AdamW steps of one model on synthetic images.

Prints one JSON line: method, size, batch, img_per_s, flops_per_img, plus the
step time, the time of the token selection alone (HOG + PSTS, or the random
masking of the baselines) and its share of the step, and achieved TFLOP/s.
Synthetic images exclude the input pipeline: this measures the model only.
On CUDA the record also holds the peak allocated memory and the MFU against the
device's dense bf16 peak (the trainer's table in ``selectivemae_ds.metrics``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import platform
import time
from typing import Any

import torch

from selectivemae_ds.errors import ConfigError, run_cli
from selectivemae_ds.metrics import mfu, peak_tflops
from selectivemae_ds.models import ModelConfig, build_model, method_names
from selectivemae_ds.models.vit import flash_attn_available

BENCH_SIZES = ("tiny", "small", "base", "large", "huge")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# DALI ships one distribution per CUDA major; the first one installed is reported.
DALI_DISTRIBUTIONS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali")


def _dist_version(*names: str) -> str | None:
    """Installed version of the first distribution in `names`, None when none is installed."""
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """Versions a benchmark record carries, read from package metadata (nothing heavy imported).

    None marks a package that is not installed (e.g. DALI for model-only runs).
    """
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": _dist_version("deepspeed"),
        "dali": _dist_version(*DALI_DISTRIBUTIONS),
        "timm": _dist_version("timm"),
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name (e.g. "NVIDIA H100 80GB HBM3"), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_mem_gb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on `device` since the last reset, in GB (1e9 bytes); None on CPU.

    Decimal GB so that a "< 40 GB" target is checked against the larger of the two units.
    """
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def sync(device: torch.device) -> None:
    """Wait for queued device work (host sync on purpose: we are timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_ctx(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when asked (the caller's choice, as in training); nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn: Any, iters: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of fn() over `iters` calls.

    CPU time sums all threads of this process; on a CPU shared with other jobs
    it moves far less than wall time, so it is the steadier CPU-side number.
    """
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters, (time.process_time() - start_cpu) / iters


class ModelBench:
    """One model, optimizer and synthetic batch, ready to time steps and selection.

    Kept as an object so a driver can interleave several methods in rounds
    (bench/model.py does, to spread a shared machine's noise evenly).
    """

    def __init__(
        self,
        method: str,
        size: str,
        batch: int,
        device: str = "cpu",
        dtype: str = "fp32",
        img_size: int = 224,
        progress: float = 0.5,
        attn_impl: str = "sdpa",
        seed: int = 0,
        peak_tflops_override: float = 0.0,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress
        self.peak_tflops = peak_tflops(self.device, peak_tflops_override)
        if self.device.type == "cuda":
            # The peak then covers this model, its optimizer state and the steps timed on it
            # (and any other bench alive in the same process, e.g. bench/model.py's rounds).
            torch.cuda.reset_peak_memory_stats(self.device)
        torch.manual_seed(seed)
        model_cfg = ModelConfig(method=method, size=size, img_size=img_size, attn_impl=attn_impl)
        self.model = build_model(model_cfg).to(self.device)
        self.model.train()
        # Fused AdamW on CUDA: one kernel for all parameters.
        self.optim = torch.optim.AdamW(
            self.model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=self.device.type == "cuda"
        )
        self.imgs = torch.randn(batch, 3, img_size, img_size, device=self.device)
        with autocast_ctx(self.device, dtype), torch.no_grad():
            self.patches = self.model.encoder.embed_patches(self.imgs)
        self.meta = {"method": method, "size": size, "img_size": img_size, "batch": batch, "device": device}

    def step(self) -> None:
        """One training step: forward under the chosen autocast, backward, AdamW."""
        self.optim.zero_grad(set_to_none=True)
        with autocast_ctx(self.device, self.dtype):
            out = self.model(self.imgs, self.progress)
        out.loss.backward()
        self.optim.step()

    def select(self) -> None:
        """The method's token selection alone (HOG + PSTS, or random masking), as the step runs it.

        The patch embeddings are computed outside the timing: every method embeds them anyway.
        """
        with autocast_ctx(self.device, self.dtype), torch.no_grad():
            self.model.spec.select(self.model, self.imgs, self.patches, self.progress)

    def time_steps(self, steps: int) -> tuple[float, float]:
        """(wall, CPU) seconds per training step over `steps` steps."""
        return timed(self.step, steps, self.device)

    def time_select(self, steps: int) -> tuple[float, float]:
        """(wall, CPU) seconds per selection over `steps` calls."""
        return timed(self.select, steps, self.device)

    def record(
        self, step_s: float, select_s: float, steps: int, step_cpu_s: float, select_cpu_s: float
    ) -> dict[str, Any]:
        """The JSON record for measured step and selection times (wall and process CPU)."""
        batch = self.imgs.shape[0]
        flops = self.model.flops_per_image()
        return {
            "mode": "model",
            **self.meta,
            "device_name": device_name(self.device),
            "steps": steps,
            "dtype": self.dtype,
            "img_per_s": round(batch / step_s, 3),
            "step_ms": round(step_s * 1e3, 2),
            "select_ms": round(select_s * 1e3, 3),
            "select_share": round(select_s / step_s, 4),
            "cpu_ms_per_img": round(step_cpu_s / batch * 1e3, 2),
            "select_cpu_share": round(select_cpu_s / step_cpu_s, 4),
            "flops_per_img": flops,
            "achieved_tflops": round(flops * batch / step_s / 1e12, 4),
            "mfu": _round(mfu(batch / step_s, flops, 1, self.peak_tflops), 4),
            "peak_mem_gb": peak_mem_gb(self.device),
            "visible": self.model.num_visible,
            "targets": self.model.num_targets,
            "params_m": round(sum(p.numel() for p in self.model.parameters()) / 1e6, 2),
            "torch": torch.__version__,
            "versions": versions(),
        }


def _round(value: float | None, digits: int) -> float | None:
    """round() that passes None (an unknown MFU) through."""
    return None if value is None else round(value, digits)


def run_benchmark(
    method: str,
    size: str,
    batch: int,
    steps: int,
    warmup: int = 2,
    device: str = "cpu",
    dtype: str = "fp32",
    img_size: int = 224,
    progress: float = 0.5,
    attn_impl: str = "sdpa",
    seed: int = 0,
    peak_tflops_override: float = 0.0,
) -> dict[str, Any]:
    """Time `steps` training steps (after `warmup`) and the selection alone; return the record."""
    bench = ModelBench(method, size, batch, device, dtype, img_size, progress, attn_impl, seed, peak_tflops_override)
    for _ in range(warmup):
        bench.step()
    step_s, step_cpu_s = bench.time_steps(steps)
    bench.select()
    select_s, select_cpu_s = bench.time_select(steps)
    return bench.record(step_s, select_s, steps, step_cpu_s, select_cpu_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smae-bench model",
        description="fwd+bwd+AdamW steps on synthetic images; prints one JSON line.",
    )
    parser.add_argument("--method", choices=method_names(), default="selectivemae",
                        help="pretraining method (a registered name)")
    parser.add_argument("--size", choices=BENCH_SIZES, default="base", help="encoder size")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="device (default: cuda if available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp32, or bf16 autocast")
    parser.add_argument("--img-size", type=int, default=224, help="square image side in pixels")
    parser.add_argument(
        "--progress", type=float, default=0.5, help="training progress in [0, 1] (PSTS stage; 0.5 = far)"
    )
    parser.add_argument("--attn-impl", choices=("sdpa", "flash"), default="sdpa", help="attention kernel")
    parser.add_argument("--seed", type=int, default=0, help="torch seed")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0,
        help="dense bf16 peak TFLOP/s of the device for MFU; 0 = from the device name (null when unknown)",
    )
    return parser


def check_args(args: argparse.Namespace, device: str) -> None:
    """ConfigError for options that cannot run, before anything is built."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise ConfigError("--batch and --steps must be >= 1, --warmup >= 0")
    if not 0.0 <= args.progress <= 1.0:
        raise ConfigError(f"--progress must be in [0, 1], got {args.progress}")
    if args.attn_impl == "flash" and not flash_attn_available():
        raise ConfigError("--attn-impl flash: the flash-attn package is not installed (pip install .[flash])")
    try:
        ModelConfig(method=args.method, size=args.size, img_size=args.img_size, attn_impl=args.attn_impl).validate()
    except ValueError as err:
        # ModelConfig.validate names the key (e.g. model.img_size); here it came from a flag.
        raise ConfigError(f"{err} (from the command-line flags)") from err


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args(args, device)
    record = run_benchmark(args.method, args.size, args.batch, args.steps, warmup=args.warmup, device=device,
                           dtype=args.dtype, img_size=args.img_size, progress=args.progress,
                           attn_impl=args.attn_impl, seed=args.seed, peak_tflops_override=args.peak_tflops)
    print(json.dumps(record), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``smae-bench model``; exit codes from :mod:`selectivemae_ds.errors`."""
    return run_cli(_main, argv)
