"""kNN / linear-probe accuracy of our initialization vs MAE vs SelectiveMAE after the same short
CPU pretraining on the bundled images; prints one JSON object.

    .venv/bin/python bench/knn_compare.py --work /tmp/knn --steps 300

1. `smae-pack assets/neon --max-side 128`: the bundled scenes sliced into 128 px tiles
   (a few hundred real records; the small side keeps a CPU run short).
2. `smae-pretrain` the demo model (ViT-tiny, 64 px, decoder depth 2 / width 128) once per
   method with the same steps, batch, data and seed (lr from each method's rule).
3. `smae-export` both; `smae-eval make-treecrowns` builds the labeled set from the
   bundled crown annotations; `smae-eval knn` / `linear` for our own initialization
   (`--weights init` of the MAE run: the weights its step 0 held), MAE and SelectiveMAE
   with cls and mean pooling.

Superseded by bench/learning.py (64 patches, an lr sweep, fine-tuning over seeds, a
scene-disjoint split); kept because bench/RESULTS.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="work directory (data, runs, weights)")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per method (default 300)")
    ap.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    args = ap.parse_args(argv)
    work = args.work
    data = work / "data"
    if not (data / "manifest.json").is_file():
        run([str(BIN / "smae-pack"), "assets/neon", "--out", str(data), "--max-side", "128", "--workers", "2",
             "--quiet"])
    labeled = work / "treecrowns"
    if not labeled.is_dir():
        run([str(BIN / "smae-eval"), "make-treecrowns", "--out", str(labeled)])
    records = json.loads((data / "manifest.json").read_text())["count"]
    result: dict = {"records": records, "steps": args.steps, "global_batch": args.batch, "pretrain_seconds": {},
                    "final_loss": {}, "eval": []}
    weights = {"init": "init"}
    for method in ("mae", "selectivemae"):
        run_dir = work / f"run_{method}"
        out = work / f"{method}.safetensors"
        if not out.is_file():
            t0 = time.time()
            run([str(BIN / "smae-pretrain"), "--config", "configs/demo.toml", "--deepspeed_config",
                 "ds_configs/cpu_smoke.json", "--set", f"model.method={method}", "--set", f"data.path={data}",
                 "--set", f"run_dir={run_dir}", "--set", f"train.steps={args.steps}",
                 "--set", f"train.global_batch={args.batch}", "--set", f"train.micro_batch={args.batch}",
                 "--set", f"checkpoint.every_steps={args.steps}", "--set", "train.log_every=25",
                 "--set", "train.picture_every=0", "--set", "optim.warmup_steps=20"])
            result["pretrain_seconds"][method] = round(time.time() - t0, 1)
            run([str(BIN / "smae-export"), str(run_dir), "--out", str(out)])
        losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["final_loss"][method] = [r["loss"] for r in losses if "loss" in r][-1]
        weights[method] = str(out)
    for name, w in weights.items():
        for mode in ("knn", "linear"):
            for pool in ("cls", "mean"):
                extra = ["--config", str(work / "run_mae")] if w == "init" else []
                line = run([str(BIN / "smae-eval"), mode, "--weights", w, "--data", str(labeled), "--pool", pool,
                            *extra])
                r = json.loads(line)
                result["eval"].append({"encoder": name, "mode": mode, "pool": pool, "accuracy": r["accuracy"],
                                       "n_train": r["n_train"], "n_test": r["n_test"]})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
