"""Steps per epoch with InfoBatch on the bundled data: packs assets/neon with smae-pack, trains the
demo config on the CPU for a few epochs with data.infobatch on, and counts the optimizer steps of
each epoch from metrics.jsonl; prints one JSON object (and writes it with --out).

    DS_ACCELERATOR=cpu .venv/bin/python bench/infobatch.py --work /tmp/ib_bench [--epochs 8]
        [--global-batch 2] [--out bench/results/infobatch.json]

Without InfoBatch every epoch has ``records // global_batch`` steps (the loader drops the last
partial global batch); that is the baseline the savings are counted against. The bundled data
packs to 13 records, so the default global batch is 2 (6 steps per full epoch); the demo's 8
would leave one step per epoch and nothing to save.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def steps_per_epoch(metrics: Path) -> list[int]:
    """Optimizer steps of each epoch, from the per-step log records (train.log_every = 1)."""
    counts: list[int] = []
    before = 0.0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "event" in rec:
            continue
        epoch = math.floor(before + 1e-9)
        while len(counts) <= epoch:
            counts.append(0)
        counts[epoch] += 1
        before = rec["epoch"]
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the packed data and the run (created)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs (default 8: the last one is unpruned)")
    ap.add_argument("--global-batch", type=int, default=2, help="images per optimizer step (default 2)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    data = args.work / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run([str(BIN / "smae-pack"), str(REPO / "assets" / "neon"), "--out", str(data), "--workers", "1"],
                       check=True, env=env, capture_output=True)
    records = json.loads((data / "manifest.json").read_text(encoding="utf-8"))["count"]
    run = args.work / "run"
    if run.exists():
        raise SystemExit(f"{run} exists; remove it or pass another --work")
    cmd = [str(BIN / "smae-pretrain"), "--config", str(REPO / "configs" / "demo.toml"),
           "--deepspeed_config", str(REPO / "ds_configs" / "cpu_smoke.json"),
           "--set", f"data.path={data}", "--set", f"run_dir={run}", "--set", "data.infobatch=true",
           "--set", "train.steps=0", "--set", f"train.epochs={args.epochs}",
           "--set", f"train.global_batch={args.global_batch}", "--set", "train.micro_batch=1",
           "--set", "train.log_every=1", "--set", "train.picture_every=0", "--set", "checkpoint.every_steps=0",
           "--set", "optim.warmup_steps=-1", "--set", "optim.warmup_epochs=1"]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
    counts = steps_per_epoch(run / "metrics.jsonl")
    full = records // args.global_batch
    total = sum(counts)
    pruned_epochs = [c for e, c in enumerate(counts) if e < 0.875 * args.epochs and e > 0]
    result = {
        "records": records, "global_batch": args.global_batch, "epochs": args.epochs,
        "config": "configs/demo.toml, data.infobatch = true (ratio 0.5, delta 0.875), micro batch 1, 1 CPU rank",
        "steps_per_full_epoch": full,
        "steps_per_epoch": counts,
        "steps_total": total,
        "steps_total_without_infobatch": full * args.epochs,
        "steps_saved_fraction": round(1 - total / (full * args.epochs), 4),
        # Epoch 0 has no scores yet (nothing pruned); epochs past 0.875 * epochs do not prune.
        "mean_steps_per_pruning_epoch": round(sum(pruned_epochs) / len(pruned_epochs), 3) if pruned_epochs else None,
        "steps_saved_per_pruning_epoch_fraction":
            round(1 - sum(pruned_epochs) / (full * len(pruned_epochs)), 4) if pruned_epochs else None,
    }
    text = json.dumps(result)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
