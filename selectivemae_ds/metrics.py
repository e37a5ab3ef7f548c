"""Training metrics on rank 0: TensorBoard, JSONL and a compact console line; MFU; pictures
(drawn by :func:`selectivemae_ds.visualize.picture_grid`).

Only rank 0 constructs a :class:`MetricsWriter`; the trainer hands it host numbers it
already has (the one per-step host sync happens in the trainer), so logging adds no
device synchronization of its own.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, SXM parts).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def peak_tflops(device: torch.device, override: float) -> float | None:
    """Peak TFLOP/s of one device: ``override`` if > 0, else from the CUDA device name, else None (CPU)."""
    if override > 0.0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def mfu(images_per_s: float, flops_per_image: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all devices (None if unknown)."""
    if peak is None or peak <= 0.0:
        return None
    return images_per_s * flops_per_image / (world_size * peak * 1e12)


class MetricsWriter:
    """Rank-0 sink: ``run_dir/metrics.jsonl``, ``run_dir/tensorboard/`` and one console line per log step."""

    def __init__(self, run_dir: str | os.PathLike[str], resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.tb_dir = self.run_dir / "tensorboard"
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        # purge_step drops TensorBoard events past the resume step, so a resumed run
        # (or a rollback) does not leave two curves over the same steps.
        self.tb = SummaryWriter(str(self.tb_dir), purge_step=resume_step if resume_step > 0 else None)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``) to JSONL and TensorBoard and print a compact line.

        The JSONL is strict JSON: a value that is unknown or not finite (the loss of a window
        without an applied step, the gradient norm after a skipped step) is written as null."""
        step = int(record["step"])
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "total_steps") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"train/{key}", value, step)
        self.tb.flush()
        print(format_line(record), file=sys.stdout, flush=True)

    def event(self, record: dict[str, Any]) -> None:
        """A non-periodic event (checkpoint, rollback, resume) into the JSONL and the console."""
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        print(f"[{record.get('event')}] " + " ".join(f"{k}={v}" for k, v in record.items() if k != "event"),
              flush=True)

    def picture(self, tag: str, grid: Tensor, step: int) -> None:
        """Add a (3, H, W) float image in [0, 1]."""
        self.tb.add_image(tag, grid, step)
        self.tb.flush()

    def close(self) -> None:
        """Flush and close both sinks."""
        self.tb.close()
        self.jsonl.close()


def _fmt(value: Any, spec: str) -> str:
    """Format a number, or "null" when it is unknown."""
    return "null" if value is None else format(value, spec)


def format_line(r: dict[str, Any]) -> str:
    """The compact console line of one log record."""
    return (
        f"step {r['step']}/{r['total_steps']} ep {r['epoch']:.2f} loss {_fmt(r['loss'], '.4f')} lr {r['lr']:.2e} "
        f"gnorm {_fmt(r['grad_norm'], '.3f')} img/s {r['img_per_s']:.1f} ({r['img_per_s_per_rank']:.1f}/rank) "
        f"wait {100 * r['data_wait']:.0f}% mfu {'n/a' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} "
        + (f"psts {r['psts_stage']} " if "psts_stage" in r else "") + f"nonfinite {r['nonfinite_steps']}"
    )
