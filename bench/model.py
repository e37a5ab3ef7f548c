"""Training throughput of every registered method (SelectiveMAE, MAE, CrossMAE, ...), in one run.

    .venv/bin/python bench/model.py                      # CPU fp32, ViT-S and ViT-B
    .venv/bin/python bench/model.py --gpu-sizes small base large   # + CUDA bf16 when present

Per (device, size) every method's model is built once and timed in interleaved
rounds (sm, mae, cross, sm, mae, cross, ...); each keeps its fastest round
(by wall time; the round's process CPU time is reported with it).
On a machine shared with other jobs this spreads the interference evenly
over the methods instead of penalizing whichever ran during a busy spell.

Prints one JSON object: every record of `smae-bench model` (img/s, step and
selection time, FLOPs), and per (device, size) every method's throughput over
mae's (`<method>/mae`, from wall and from CPU time) and each method's selection
share of its step (`<method>_select_share`). GPU targets (issue 4): selectivemae
>= 3x mae at ViT-B, >= 3.5x at ViT-L; HOG + PSTS <= 5% of the step.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from selectivemae_ds.benchmark.model import ModelBench  # noqa: E402
from selectivemae_ds.models import method_names  # noqa: E402


def bench_size(
    size: str, batch: int, steps: int, rounds: int, warmup: int, device: str, dtype: str
) -> list[dict[str, Any]]:
    """All methods at one size: interleaved rounds, fastest round per method."""
    benches = [ModelBench(method, size, batch, device=device, dtype=dtype) for method in method_names()]
    for bench in benches:
        for _ in range(warmup):
            bench.step()
        bench.select()
    inf = (float("inf"), float("inf"))
    best_step = [inf] * len(benches)
    best_select = [inf] * len(benches)
    for _ in range(rounds):
        for i, bench in enumerate(benches):
            best_step[i] = min(best_step[i], bench.time_steps(steps))
            best_select[i] = min(best_select[i], bench.time_select(steps))
    records = [
        b.record(s[0], t[0], steps * rounds, s[1], t[1]) for b, s, t in zip(benches, best_step, best_select)
    ]
    for rec in records:
        rec["rounds"] = rounds
    del benches
    if device == "cuda":
        torch.cuda.empty_cache()
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Ratios per '<device>/<dtype>/<size>' key: every method's throughput over mae's, from
    wall time and from process CPU time (steadier on a shared CPU), and each method's
    selection share of the step."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(f"{rec['device']}/{rec['dtype']}/{rec['size']}", {})[rec["method"]] = rec
    for key, by_method in groups.items():
        mae = by_method["mae"]
        ratios: dict[str, float] = {}
        for method, rec in by_method.items():
            if rec is mae:  # the reference itself
                continue
            ratios[f"{method}/mae"] = round(rec["img_per_s"] / mae["img_per_s"], 3)
            ratios[f"{method}/mae_cpu_time"] = round(mae["cpu_ms_per_img"] / rec["cpu_ms_per_img"], 3)
        ratios.update({f"{m}_select_share": rec["select_share"] for m, rec in by_method.items()})
        out[key] = ratios
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "base"], help="encoder sizes on the CPU")
    parser.add_argument("--batch", type=int, default=4, help="CPU images per step")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest counts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU runs")
    parser.add_argument(
        "--gpu-sizes", nargs="*", default=["small", "base", "large"], help="encoder sizes on CUDA (bf16), if present"
    )
    parser.add_argument("--gpu-batch", type=int, default=128, help="CUDA images per step")
    parser.add_argument("--gpu-steps", type=int, default=10, help="CUDA timed steps per round")
    args = parser.parse_args(argv)

    started = time.time()
    records: list[dict[str, Any]] = []
    if not args.no_cpu:
        for size in args.sizes:
            records += bench_size(size, args.batch, args.steps, args.rounds, args.warmup, "cpu", "fp32")
    if torch.cuda.is_available():
        for size in args.gpu_sizes:
            records += bench_size(size, args.gpu_batch, args.gpu_steps, args.rounds, 3, "cuda", "bf16")
    report = {
        "bench": "model",
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "wall_s": round(time.time() - started, 1),
        "ratios": summarize(records),
        "records": records,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
