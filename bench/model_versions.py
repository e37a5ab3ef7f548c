"""`smae-bench model` for every method under two source trees, interleaved, in one run.

    .venv/bin/python bench/model_versions.py --before /tmp/old_tree --after . --size base

Each round runs `smae-bench model --device cpu` once per (method, tree), alternating
the trees (before, after, before, after, ...) so that a shared machine's load falls on
both alike; each (method, tree) keeps its fastest round. Prints one JSON object: the
records and, per method, after/before throughput from wall time and from process CPU
time (the steadier number on a shared CPU). Used to check that a refactor costs no speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_one(tree: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One `smae-bench model` process with `tree` first on the path; its JSON record."""
    env = dict(os.environ, PYTHONPATH=str(tree), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "selectivemae_ds.benchmark.cli", "model", "--device", "cpu", "--method", method,
           "--size", args.size, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", "1",
           "--img-size", str(args.img_size)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="source tree of the old version")
    parser.add_argument("--after", type=Path, default=Path("."), help="source tree of the new version")
    parser.add_argument("--methods", nargs="+", default=["selectivemae", "mae", "crossmae"], help="methods to time")
    parser.add_argument("--size", default="base", help="encoder size")
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest counts")
    args = parser.parse_args(argv)
    started = time.time()
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for _ in range(args.rounds):
        for method in args.methods:
            for name, tree in (("before", args.before), ("after", args.after)):
                rec = run_one(tree.resolve(), method, args)
                print(json.dumps({"version": name, **rec}), file=sys.stderr, flush=True)  # progress
                key = (method, name)
                if key not in best or rec["step_ms"] < best[key]["step_ms"]:
                    best[key] = rec
    ratios = {
        m: {
            "after/before_img_per_s": round(best[(m, "after")]["img_per_s"] / best[(m, "before")]["img_per_s"], 3),
            "after/before_cpu_time": round(best[(m, "before")]["cpu_ms_per_img"] / best[(m, "after")]["cpu_ms_per_img"], 3),
        }
        for m in args.methods
    }
    print(json.dumps({
        "bench": "model_versions",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "wall_s": round(time.time() - started, 1),
        "ratios": ratios,
        "records": [{"version": v, **rec} for (m, v), rec in sorted(best.items())],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
