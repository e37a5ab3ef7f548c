"""Does pretraining learn? Every registered method (SelectiveMAE, MAE, CrossMAE, SimMIM,
CtxMIM) pretrained on real remote-sensing images at the same pretraining FLOP budget, each
checkpoint scored by end-to-end fine-tuning (3 seeds) and kNN / linear probes (with the
feature spread) on a scene-disjoint split of a real labeled set, against our own
initialization and the pixel floors.

    .venv/bin/python bench/learning.py --work /tmp/learn --preset cpu-small  # ~45 min, 2 cores
    .venv/bin/python bench/learning.py --work /tmp/learn                 # the CPU preset (~2 h)
    .venv/bin/python bench/learning.py --work /tmp/learn --preset gpu    # a longer run on a GPU

Steps (each skipped when its output is already in --work, so a run resumes):
1. Labeled set: `smae-eval make-treecrowns` (tree crowns vs background from the DeepForest
   NEON annotations bundled in assets/neon). Split by scene (`--split-by`, the scene prefix
   of the file names); the test scenes are fixed by the split seed, never chosen by score.
2. Pretraining images: the bundled assets/neon images *except the test scenes*, sliced by
   `smae-pack --max-side 256` into tiles.
3. Learning-rate sweep per method: short runs (--sweep-fraction of the budget) at each of
   --sweep-lrs; the lr with the lowest mean pretraining loss over the last third of its
   logged windows wins. The sweep never looks at a label.
4. Pretraining per method with its lr to the same FLOP budget (the model's
   `flops_per_image`, fwd + bwd, times images): steps = budget / (flops_per_image * batch),
   checkpoints at --checkpoints fractions of the budget, each exported to timm weights.
5. Evaluation of `init` (the same config's step-0 weights) and every checkpoint: `smae-eval
   finetune` over --seeds (MAE's recipe, --ft-epochs at --ft-img-size) and kNN / linear probes
   (mean-pooled features); the floors (majority, raw pixels, mean color) on the same split.
   Results are appended to --work/results.json after each encoder.
6. A plot (--work/NAME.png, drawn with PIL, beside NAME.json; --eval-name, default results) of fine-tuned top-1 against pretraining
   FLOPs, one line per method with +-1 std bars, the init and raw-pixel floors as lines; and
   the verdict against the targets (>= 5 points over init with the gap > 2 std; SelectiveMAE
   at <= half of MAE's FLOPs reaching MAE's final accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from selectivemae_ds.models.methods.registry import method_names  # noqa: E402  (after the path fix-up)

METHODS = method_names()
SCENE_REGEX = r"([^/]+)_\d+\.png$"

# Model and data scale shared by the presets: ViT-tiny at 128 px / patch 16 = 64 patches
# (SelectiveMAE encodes 9 and reconstructs 16 of them; MAE encodes 16 and reconstructs 48).
MODEL_SETS = ["model.size=tiny", "model.img_size=128", "model.patch_size=16", "model.decoder_depth=2",
              "model.decoder_dim=128", "model.decoder_heads=4"]

PRESETS: dict[str, dict[str, Any]] = {
    # Measured: 55 minutes for SelectiveMAE and MAE on a shared 2-core CPU (bench/RESULTS.md);
    # about two hours for all five methods at the same per-FLOP rates.
    "cpu": {"budget_tflop": 4.0, "batch": 32, "sweep_lrs": "3e-4,1e-3", "sweep_fraction": 0.25,
            "checkpoints": "0.25,0.5,1", "warmup_fraction": 0.1, "seeds": "0,1,2", "ft_epochs": 5,
            "ft_warmup_epochs": 1.0, "ft_img_size": 64, "ft_batch": 32, "threads": 2},
    # A quarter of the budget and 2 fine-tuning epochs: all five methods in about 45 minutes on
    # 2 cores (estimated from the measured per-FLOP and per-epoch rates of the two runs recorded).
    "cpu-small": {"budget_tflop": 1.0, "batch": 32, "sweep_lrs": "3e-4,1e-3", "sweep_fraction": 0.25,
                  "checkpoints": "0.5,1", "warmup_fraction": 0.1, "seeds": "0,1,2", "ft_epochs": 2,
                  "ft_warmup_epochs": 0.5, "ft_img_size": 64, "ft_batch": 32, "threads": 1},
    # One GPU (minutes per method): 50x the CPU budget, the fine-tuning at the pretraining size.
    "gpu": {"budget_tflop": 200.0, "batch": 256, "sweep_lrs": "1.5e-4,5e-4,1.5e-3", "sweep_fraction": 0.2,
            "checkpoints": "0.125,0.25,0.5,1", "warmup_fraction": 0.05, "seeds": "0,1,2", "ft_epochs": 30,
            "ft_warmup_epochs": 3.0, "ft_img_size": 128, "ft_batch": 64, "threads": 8},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], threads: int) -> str:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def flops_per_image(method: str) -> float:
    from selectivemae_ds.config import load_config

    cfg = load_config(REPO / "configs" / "demo.toml", [f"data.path={REPO}", f"model.method={method}", *MODEL_SETS])
    from selectivemae_ds.models import flops_per_image as fpi

    return float(fpi(cfg.model, cfg.method_cfg))


def pretrain(work: Path, data: Path, method: str, run_dir: Path, steps: int, lr: float, batch: int,
             every: int, warmup: int, threads: int) -> None:
    from selectivemae_ds import checkpoint

    if checkpoint.is_complete(run_dir / "checkpoints" / f"step_{steps:08d}"):
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run([str(BIN / "smae-pretrain"), "--config", "configs/demo.toml", "--deepspeed_config",
         "ds_configs/cpu_smoke.json", *[a for s in MODEL_SETS for a in ("--set", s)],
         "--set", f"model.method={method}", "--set", f"data.path={data}", "--set", f"run_dir={run_dir}",
         "--set", f"train.steps={steps}", "--set", f"train.global_batch={batch}",
         "--set", f"train.micro_batch={batch}", "--set", f"checkpoint.every_steps={every}",
         "--set", "checkpoint.keep=100", "--set", f"train.log_every={max(1, min(10, steps // 10))}",
         "--set", "train.picture_every=0", "--set", f"optim.warmup_steps={warmup}", "--set", f"optim.lr={lr}",
         "--set", "data.workers=1", "--set", "data.decode_threads=1"], threads)


def losses(run_dir: Path) -> list[float]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec and rec.get("loss") is not None:
            out.append(float(rec["loss"]))
    return out


def eval_args(mode: str, weights: str, labeled: Path, p: dict[str, Any], out: Path | None, config: str | None,
              extra: list[str]) -> Any:
    from selectivemae_ds.evaluate import parser

    argv = [mode, "--weights", weights, "--data", str(labeled), "--split-by", SCENE_REGEX, "--workers", "0",
            "--img-size", str(p["ft_img_size"]), "--batch", str(p["ft_batch"]), *extra]
    if config:
        argv += ["--config", config]
    if out is not None:
        argv += ["--out", str(out)]
    return parser().parse_args(argv)


PROBE_KEYS = ("knn", "linear", "feature_cosine", "between_share")


def init_sets(method: str) -> list[str]:
    """``--set`` arguments that make ``--weights init`` build the step-0 encoder of this
    benchmark's pretraining runs (configs/demo.toml with MODEL_SETS and train.seed as they ran)."""
    return [a for s in (*MODEL_SETS, f"model.method={method}") for a in ("--set", s)]


def probe_encoder(weights: str, labeled: Path, p: dict[str, Any], config: str | None,
                  extra: list[str]) -> dict[str, Any]:
    """kNN / linear probes and the feature spread (one frozen feature pass)."""
    from selectivemae_ds.evaluate import load_labeled, probe

    args = eval_args("knn", weights, labeled, p, None, config, ["--pool", "mean", *extra])
    probes = probe(args, load_labeled(args))  # the floors come with the fine-tuning report
    return {k: probes[k] for k in PROBE_KEYS}


def evaluate_encoder(name: str, weights: str, labeled: Path, work: Path, p: dict[str, Any],
                     config: str | None, eval_name: str, extra: list[str]) -> dict[str, Any]:
    from selectivemae_ds import finetune

    t0 = time.time()
    probes = probe_encoder(weights, labeled, p, config, extra)
    ft = finetune.run(eval_args("finetune", weights, labeled, p, work / f"finetune_{eval_name}" / name, config,
                                ["--seeds", p["seeds"], "--epochs", str(p["ft_epochs"]),
                                 "--warmup-epochs", str(p["ft_warmup_epochs"]), *extra]))
    return {"encoder": name, "weights": weights, **probes, "finetune_top1": ft["top1"], "finetune": ft["top1_summary"], "final_train_loss": ft["final_train_loss"],
            "floors": ft["floors"], "split": {k: ft[k] for k in ("n_train", "n_test", "train_groups", "test_groups")},
            "seconds": round(time.time() - t0, 1)}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from whatever has been evaluated so far."""
    evals = {e["encoder"]: e for e in result["evals"]}
    out: dict[str, Any] = {}
    init = evals.get("init")
    if init is None:
        return out
    i_mean, i_std = init["finetune"]["mean"], init["finetune"]["std"]
    for method in METHODS:
        done = [e for e in result["evals"] if e.get("method") == method]
        if not done:
            continue
        final = max(done, key=lambda e: e["pretrain_flops"])
        gap = final["finetune"]["mean"] - i_mean
        spread = max(final["finetune"]["std"], i_std)
        out[f"{method}_beats_init_by_5_points"] = {
            "encoder": final["encoder"], "gap_points": round(100 * gap, 2), "two_std_points": round(200 * spread, 2),
            "met": bool(gap >= 0.05 and gap > 2 * spread)}
    smae = [e for e in result["evals"] if e.get("method") == "selectivemae"]
    mae = [e for e in result["evals"] if e.get("method") == "mae"]
    if smae and mae:
        mae_final = max(mae, key=lambda e: e["pretrain_flops"])
        half = [e for e in smae if e["pretrain_flops"] <= 0.5 * mae_final["pretrain_flops"] * 1.001]
        best = max(half, key=lambda e: e["finetune"]["mean"]) if half else None
        out["selectivemae_matches_mae_at_half_flops"] = {
            "mae": mae_final["encoder"], "mae_top1": mae_final["finetune"]["mean"],
            "selectivemae": best["encoder"] if best else None,
            "selectivemae_top1": best["finetune"]["mean"] if best else None,
            # Matching MAE means something only when MAE itself learned (its first target met).
            "mae_beats_init": out.get("mae_beats_init_by_5_points", {}).get("met", False),
            "met": bool(best and best["finetune"]["mean"] >= mae_final["finetune"]["mean"]
                        and out.get("mae_beats_init_by_5_points", {}).get("met", False))}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Fine-tuned top-1 vs pretraining FLOPs (PIL: matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 760, 470, 70, 170, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    evals = result["evals"]
    init = next((e for e in evals if e["encoder"] == "init"), None)
    pts = [e for e in evals if e.get("method")]
    if init is None:
        img.save(path)
        return
    ys = [init["finetune"]["mean"], init["floors"]["raw_pixels_linear"], init["floors"]["majority"]]
    for e in pts:
        ys += [e["finetune"]["mean"] - e["finetune"]["std"], e["finetune"]["mean"] + e["finetune"]["std"]]
    lo, hi = max(0.0, min(ys) - 0.03), min(1.0, max(ys) + 0.03)
    xmax = max((e["pretrain_flops"] for e in pts), default=1e12) / 1e12

    def xy(x: float, y: float) -> tuple[float, float]:
        return L + (W - L - R) * x / xmax, T + (H - T - B) * (1 - (y - lo) / (hi - lo))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(6):
        y = lo + (hi - lo) * k / 5
        d.text((8, xy(0, y)[1] - 6), f"{100 * y:.1f}", fill="black")
        x = xmax * k / 5
        d.text((xy(x, lo)[0] - 10, H - B + 6), f"{x:.2g}", fill="black")
    d.text((L + 120, H - 22), "pretraining TFLOPs (fwd + bwd)", fill="black")
    d.text((L, 12), f"fine-tuned test top-1 (%) after {result['params']['ft_epochs']} epoch(s), mean of seeds +- 1 std; "
                    "scene-disjoint tree-crown split", fill="black")
    for y, color, label in ((init["finetune"]["mean"], (120, 120, 120), "init (our step 0)"),
                            (init["floors"]["raw_pixels_linear"], (200, 150, 0), "raw pixels, linear"),
                            (init["floors"]["majority"], (180, 180, 180), "majority class")):
        _, yy = xy(0, y)
        for x0 in range(L, W - R, 12):
            d.line([x0, yy, min(x0 + 6, W - R), yy], fill=color, width=2)
        d.text((W - R + 8, yy - 6), label, fill=color)
    colors = {"selectivemae": (200, 30, 30), "mae": (30, 80, 200), "crossmae": (30, 150, 60),
              "simmim": (150, 60, 170), "ctxmim": (230, 120, 0)}
    for i, method in enumerate(m for m in METHODS if any(e["method"] == m for e in pts)):
        color = colors.get(method, (0, 0, 0))
        mp = sorted((e for e in pts if e["method"] == method), key=lambda e: e["pretrain_flops"])
        line = [xy(0, init["finetune"]["mean"])] + [xy(e["pretrain_flops"] / 1e12, e["finetune"]["mean"]) for e in mp]
        if len(line) > 1:
            d.line(line, fill=color, width=2)
        for e in mp:
            x, y = xy(e["pretrain_flops"] / 1e12, e["finetune"]["mean"])
            _, y0 = xy(0, e["finetune"]["mean"] - e["finetune"]["std"])
            _, y1 = xy(0, e["finetune"]["mean"] + e["finetune"]["std"])
            d.line([x, y0, x, y1], fill=color, width=1)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.text((W - R + 8, H - B - 88 + 16 * i), f"- {method}", fill=color)
    img.save(path)


def markdown_table(result: dict[str, Any]) -> str:
    """The evaluations as a markdown table (what bench/RESULTS.md quotes)."""
    rows = ["| encoder | pretraining TFLOPs | fine-tuned top-1 per seed | mean +- std | kNN | linear | "
            "feature cosine | between share |", "|---|---|---|---|---|---|---|---|"]
    for e in sorted(result["evals"], key=lambda e: (e.get("method") or "", e["pretrain_flops"])):
        rows.append(f"| {e['encoder']} | {e['pretrain_flops'] / 1e12:.3f} | "
                    f"{', '.join(f'{x:.4f}' for x in e['finetune_top1'])} | "
                    f"{e['finetune']['mean']:.4f} +- {e['finetune']['std']:.4f} | {e['knn']:.4f} | {e['linear']:.4f} | "
                    f"{e.get('feature_cosine', float('nan')):.4f} | {e.get('between_share', float('nan')):.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="work directory (data, runs, weights, results)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="scale (default cpu)")
    for key, value in PRESETS["cpu"].items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                        help=f"override the preset's {key} (cpu preset: {value})")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"methods to pretrain (default every registered one: {','.join(METHODS)})")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot and verdict from the results JSON")
    ap.add_argument("--eval-name", default="results",
                    help="name of this evaluation pass: NAME.json, NAME.png, finetune_NAME/ in --work (default "
                         "results); a new name re-evaluates the pretrained checkpoints of results.json with other "
                         "fine-tuning settings")
    ap.add_argument("--encoders", default=None,
                    help="comma-separated encoder names to evaluate (default all: init, then each method's "
                         "checkpoints, newest first), e.g. init,selectivemae_step29")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        ap.error(f"--methods {args.methods!r}: expected a comma-separated subset of {','.join(METHODS)}"
                 + (f" ({', '.join(unknown)} not registered)" if unknown else ""))
    p = dict(PRESETS[args.preset])
    p.update({k: v for k in PRESETS["cpu"] if (v := getattr(args, k)) is not None})
    import torch

    torch.set_num_threads(p["threads"])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / f"{args.eval_name}.json"
    plot_path = work / f"{args.eval_name}.png"
    if args.plot_only:
        result = json.loads(results_path.read_text())
        result["verdict"] = verdict(result)
        results_path.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, plot_path)
        print(markdown_table(result))
        print(json.dumps(result["verdict"], indent=1))
        return 0
    result: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results_path.name != "results.json" and (work / "results.json").is_file():
        # Another evaluation pass over the same pretraining: its sweep and runs are results.json's.
        first = json.loads((work / "results.json").read_text())
        for key in ("sweep", "pretrain"):
            result.setdefault(key, {}).update(first.get(key, {}))
        result.setdefault("started", first.get("started"))
    result.update({"preset": args.preset, "params": p, "methods": methods, "started": result.get("started") or
                   time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": {
                       "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "load_average_at_start": os.getloadavg()}})
    result.setdefault("evals", [])

    def save() -> None:
        result["verdict"] = verdict(result)
        results_path.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, plot_path)

    from selectivemae_ds.evaluate import build_treecrown_set, list_image_folder, make_split

    labeled = work / "treecrowns"
    if not (labeled / "tree").is_dir():
        build_treecrown_set(REPO / "assets" / "neon", labeled)
    paths, labels, classes = list_image_folder(labeled)
    split = make_split(paths, labels, classes, labeled, split_by=SCENE_REGEX, test_fraction=0.3, seed=0)
    test_scenes = set(split.test_groups)
    result["split"] = split.describe()
    log(f"labeled set: {len(paths)} images; test scenes {sorted(test_scenes)} ({split.test.size} images)")

    src = work / "pretrain_images"
    data = work / "pretrain_data"
    if not (data / "manifest.json").is_file():
        src.mkdir(exist_ok=True)
        for f in sorted((REPO / "assets" / "neon").iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif") and f.stem not in test_scenes:
                shutil.copy2(f, src / f.name)
        run([str(BIN / "smae-pack"), str(src), "--out", str(data), "--max-side", "256", "--min-side", "64",
             "--workers", "1", "--quiet"], p["threads"])
    manifest = json.loads((data / "manifest.json").read_text())
    result["pretrain_data"] = {"records": manifest["count"], "sources": sorted(f.name for f in src.iterdir()),
                               "excluded_test_scenes": sorted(test_scenes)}
    log(f"pretraining data: {manifest['count']} tiles from {result['pretrain_data']['sources']}")

    budget = p["budget_tflop"] * 1e12
    fractions = [float(f) for f in p["checkpoints"].split(",")]
    result.setdefault("sweep", {})
    result.setdefault("pretrain", {})
    for method in methods:
        fpi = flops_per_image(method)
        steps = max(2, round(budget / (fpi * p["batch"])))
        if method not in result["sweep"] or "chosen_lr" not in result["sweep"][method]:
            sweep_steps = max(2, round(steps * p["sweep_fraction"]))
            table = {}
            for lr in [float(x) for x in p["sweep_lrs"].split(",")]:
                run_dir = work / "sweep" / f"{method}_lr{lr:g}"
                t0 = time.time()
                pretrain(work, data, method, run_dir, sweep_steps, lr, p["batch"], sweep_steps,
                         max(1, round(p["warmup_fraction"] * sweep_steps)), p["threads"])
                ls = losses(run_dir)
                tail = ls[-max(1, len(ls) // 3):]
                table[f"{lr:g}"] = {"tail_loss": round(float(np.mean(tail)), 4), "losses": ls,
                                    "seconds": round(time.time() - t0, 1)}
                log(f"sweep {method} lr {lr:g}: {sweep_steps} steps, tail loss {table[f'{lr:g}']['tail_loss']}")
            chosen = min(table, key=lambda k: table[k]["tail_loss"])
            result["sweep"][method] = {"steps": sweep_steps, "by_lr": table, "chosen_lr": float(chosen)}
            save()
        lr = result["sweep"][method]["chosen_lr"]
        # Checkpoints every `every` steps (the smallest fraction), and the trainer always saves the last step.
        every = max(1, round(min(fractions) * steps))
        ckpt_steps = sorted({min(steps, max(every, round(f * steps / every) * every)) for f in fractions if f < 1}
                            | {steps})
        run_dir = work / "runs" / method
        t0 = time.time()
        if method not in result["pretrain"]:
            pretrain(work, data, method, run_dir, steps, lr, p["batch"], every,
                     max(1, round(p["warmup_fraction"] * steps)), p["threads"])
            result["pretrain"][method] = {"steps": steps, "lr": lr, "flops_per_image": fpi,
                                          "flops": fpi * p["batch"] * steps, "checkpoint_steps": ckpt_steps,
                                          "losses": losses(run_dir), "seconds": round(time.time() - t0, 1)}
            save()
        log(f"pretrained {method}: {steps} steps at lr {lr:g}, final loss {result['pretrain'][method]['losses'][-1]}")

    from selectivemae_ds.export import export

    done = {e["encoder"] for e in result["evals"]}
    jobs: list[tuple[str, str | None, int, str, str | None]] = [("init", None, 0, "init",
                                                                 str(REPO / "configs" / "demo.toml"))]
    finals = [(m, result["pretrain"][m]["checkpoint_steps"]) for m in methods]
    # Most telling first: each method's final checkpoint, then the earlier ones (latest first).
    for m, ck in finals:
        jobs.append((f"{m}_step{ck[-1]}", m, ck[-1], "", None))
    for depth in range(2, max(len(ck) for _, ck in finals) + 1):
        for m, ck in finals:
            if len(ck) >= depth:
                jobs.append((f"{m}_step{ck[-depth]}", m, ck[-depth], "", None))
    wanted = set(args.encoders.split(",")) if args.encoders else None
    for name, method, step, weights, config in jobs:
        if wanted is not None and name not in wanted:
            continue
        extra = init_sets(methods[0]) if weights == "init" else []
        if method is not None:
            weights = str(work / "encoders" / f"{name}.safetensors")
            if not Path(weights).is_file():
                export(work / "runs" / method / "checkpoints" / f"step_{step:08d}", weights)
        if name in done:
            old = next(e for e in result["evals"] if e["encoder"] == name)
            if any(k not in old for k in PROBE_KEYS):  # an evaluation from before the feature spread
                old.update(probe_encoder(weights, labeled, p, config, extra))
                save()
                log(f"{name}: probes {', '.join(f'{k} {old[k]}' for k in PROBE_KEYS)}")
            continue
        log(f"evaluating {name}")
        e = evaluate_encoder(name, weights, labeled, work, p, config, args.eval_name, extra)
        e["method"] = method
        e["step"] = step
        e["pretrain_flops"] = (result["pretrain"][method]["flops_per_image"] * p["batch"] * step) if method else 0.0
        result["evals"].append(e)
        save()
        log(f"{name}: finetune {e['finetune']} (seeds {e['finetune_top1']}), knn {e['knn']}, linear {e['linear']}, "
            f"{e['seconds']} s")
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save()
    print(json.dumps({"verdict": result["verdict"], "results": str(results_path), "plot": str(plot_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
