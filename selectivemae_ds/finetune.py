"""End-to-end fine-tuning of a pretrained encoder on a labeled ImageFolder, with MAE's
recipe as defaults, repeated over seeds on one split, with the floors beside it.

    smae-eval finetune --weights encoder.safetensors --data LABELED_DIR --out DIR \\
        [--split-by REGEX] [--seeds 0,1,2] [--epochs 50] [--freeze-blocks K]

The recipe (MAE's ``main_finetune.py``): AdamW (0.9, 0.999) with lr = blr * batch / 256
(blr 1e-3, batch = the global batch), layer-wise lr decay 0.75 (timm's
``param_groups_layer_decay``: the head and fc_norm at 1, block i at 0.75^(depth - i),
the patch/position embeddings at 0.75^(depth + 1)), weight decay 0.05 except biases,
norms and tokens, drop path 0.1, mean-pooled patch tokens through a new ``fc_norm``
and a new head (std 2e-5), label smoothing 0.1, per-step linear warmup then cosine to
``--min-lr`` (timm's CosineLRScheduler), RandomResizedCrop + flip for training and
resize + center crop for test; mixup / cutmix (timm's Mixup) when asked for.
``--freeze-blocks K`` keeps the embeddings and the first K blocks fixed.

Every epoch appends one JSON line (train loss, test top-1, lr, seconds) to
``DIR/seed_S/log.jsonl``; the fine-tuned classifier is saved in timm format as
``DIR/seed_S/model.safetensors`` with a JSON beside it. The report (printed and
written to ``DIR/report.json``) holds each seed's final test top-1 (the last epoch,
never the best: the test split is not for choosing), their mean and sample standard
deviation, and the floors on the same split.

Images stream through a DataLoader. One process on a CPU; on a GPU the forward runs
under bf16 autocast; under ``torchrun`` (WORLD_SIZE > 1) each rank trains on its
DistributedSampler share inside DDP and the test top-1 is summed over ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from selectivemae_ds.atomic import atomic_write_bytes, atomic_write_text, check_writable_dir
from selectivemae_ds.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from selectivemae_ds.errors import ConfigError, DataError, RunError
from selectivemae_ds.evaluate import (Encoder, ImageDataset, LabeledSet, build_timm, eval_transform, floors,
                                      load_labeled, make_loader, resolve_encoder)


@dataclass(frozen=True)
class Recipe:
    """Fine-tuning hyper-parameters; the defaults are MAE's."""

    epochs: int = 50
    batch: int = 64
    blr: float = 1e-3
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    crop_min_scale: float = 0.08
    freeze_blocks: int = 0
    clip_grad: float | None = None
    img_size: int | None = None
    workers: int = 2

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.blr > 0 and (self.lr is None or self.lr > 0), "--blr / --lr must be > 0"),
            (0 <= self.warmup_epochs < self.epochs, f"--warmup-epochs must be in [0, --epochs), got {self.warmup_epochs}"),
            (0 < self.layer_decay <= 1, f"--layer-decay must be in (0, 1], got {self.layer_decay}"),
            (0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}"),
            (0 <= self.smoothing < 1, f"--smoothing must be in [0, 1), got {self.smoothing}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup / --cutmix must be >= 0"),
            (0 < self.crop_min_scale <= 1, f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}"),
            (self.freeze_blocks >= 0, f"--freeze-blocks must be >= 0, got {self.freeze_blocks}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.blr * global_batch / 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The fine-tuning flags (the weights and data flags come from ``evaluate``)."""
    d = Recipe()
    p.add_argument("--out", required=True, help="output directory: report.json and seed_S/{log.jsonl,model.*}")
    p.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--blr", type=float, default=d.blr, help=f"base lr: lr = blr * global batch / 256 (default {d.blr})")
    p.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help=f"cosine floor (default {d.min_lr})")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help=f"linear warmup in epochs, counted per step (default {d.warmup_epochs})")
    p.add_argument("--layer-decay", type=float, default=d.layer_decay,
                   help=f"layer-wise lr decay (default {d.layer_decay})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--drop-path", type=float, default=d.drop_path, help=f"stochastic depth (default {d.drop_path})")
    p.add_argument("--smoothing", type=float, default=d.smoothing, help=f"label smoothing (default {d.smoothing})")
    p.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha; 0 = off (default 0; MAE's ViT-B: 0.8)")
    p.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha; 0 = off (default 0; MAE's ViT-B: 1.0)")
    p.add_argument("--crop-min-scale", type=float, default=d.crop_min_scale,
                   help=f"RandomResizedCrop's smallest area share (default {d.crop_min_scale})")
    p.add_argument("--freeze-blocks", type=int, default=0,
                   help="keep the patch/position embeddings, cls token and the first K blocks fixed (default 0)")
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this (default: off)")
    p.add_argument("--floor-size", type=int, default=32, help="side of the raw-pixel floor's images (default 32)")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = Recipe(epochs=args.epochs, batch=args.batch, blr=args.blr, lr=args.lr, min_lr=args.min_lr,
                    warmup_epochs=args.warmup_epochs, layer_decay=args.layer_decay, weight_decay=args.weight_decay,
                    drop_path=args.drop_path, smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix,
                    crop_min_scale=args.crop_min_scale, freeze_blocks=args.freeze_blocks, clip_grad=args.clip_grad,
                    img_size=args.img_size, workers=args.workers)
    recipe.validate()
    return recipe


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from e
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct comma-separated integers, e.g. 0,1,2")
    return seeds


# ---------------------------------------------------------------------------
# The pieces of the recipe.

def train_transform(img_size: int, min_scale: float) -> Any:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def classifier(encoder: Encoder, num_classes: int, recipe: Recipe) -> torch.nn.Module:
    """timm ViT with the encoder's weights, mean pooling + fc_norm, a new head (MAE: std 2e-5),
    and the first ``freeze_blocks`` blocks (and the embeddings) frozen."""
    from timm.layers import trunc_normal_

    model = build_timm(encoder, num_classes=num_classes, global_pool="avg", drop_path=recipe.drop_path,
                       img_size=recipe.img_size)
    trunc_normal_(model.head.weight, std=2e-5)
    torch.nn.init.zeros_(model.head.bias)
    depth = len(model.blocks)
    if recipe.freeze_blocks > depth:
        raise ConfigError(f"--freeze-blocks {recipe.freeze_blocks}: the encoder has only {depth} blocks")
    if recipe.freeze_blocks:
        frozen = [model.patch_embed, *model.blocks[:recipe.freeze_blocks]]
        for module in frozen:
            module.requires_grad_(False)
        for name in ("cls_token", "pos_embed", "reg_token"):
            param = getattr(model, name, None)
            if isinstance(param, torch.nn.Parameter):
                param.requires_grad_(False)
    return model


def param_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """timm's layer-decay groups (each with ``lr_scale`` and ``weight_decay``); frozen
    parameters are left out."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay=recipe.weight_decay,
                                    no_weight_decay_list=model.no_weight_decay(), layer_decay=recipe.layer_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> Any:
    """Per-step linear warmup from 0, then cosine to ``min_lr``; timm applies each group's lr_scale."""
    from timm.scheduler import CosineLRScheduler

    total = recipe.epochs * steps_per_epoch
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=recipe.min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False, cycle_limit=1)


def loss_and_mixer(recipe: Recipe, num_classes: int) -> tuple[torch.nn.Module, Any]:
    """Label-smoothed cross-entropy; with mixup/cutmix, timm's Mixup and a soft-target loss."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixer = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixer
    if recipe.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


# ---------------------------------------------------------------------------
# Processes and devices.

@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_world() -> World:
    """One process, or the torchrun world (WORLD_SIZE > 1: NCCL on GPUs, gloo on CPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if size > 1 else 0
    return World(rank, size, device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sum(values: list[float], world: World) -> list[float]:
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def top1(model: torch.nn.Module, data: LabeledSet, img_size: int, recipe: Recipe, world: World) -> float:
    """Test top-1 over the whole test split (each rank scores its strided share; counts are summed)."""
    model.eval()
    idx = data.split.test[world.rank::world.size]
    loader = make_loader(ImageDataset([data.paths[i] for i in idx], data.labels[idx], eval_transform(img_size)),
                         recipe.batch, recipe.workers)
    correct = 0.0
    for x, y in loader:
        with autocast(world.device):
            logits = model(x.to(world.device, non_blocking=True))
        correct += float((logits.argmax(dim=1).cpu() == y).sum())
    correct, total = _sum([correct, float(idx.size)], world)
    return correct / total


def _batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def finetune_one(encoder: Encoder, data: LabeledSet, recipe: Recipe, seed: int, out_dir: Path | None,
                 world: World | None = None, log: bool = True) -> dict[str, Any]:
    """Fine-tune one seed; return its per-epoch records and final test top-1. Writes
    ``out_dir/log.jsonl`` and ``out_dir/model.safetensors`` (+ ``.json``) on rank 0 when
    ``out_dir`` is given."""
    world = world or World(0, 1, torch.device("cpu"))
    img_size = int(recipe.img_size or encoder.img_size)
    num_classes = len(data.classes)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = classifier(encoder, num_classes, recipe).to(world.device)
    groups = param_groups(model, recipe)
    train_idx = data.split.train
    train_set = ImageDataset([data.paths[i] for i in train_idx], data.labels[train_idx],
                             train_transform(img_size, recipe.crop_min_scale))
    criterion, mixer = loss_and_mixer(recipe, num_classes)
    drop_last = mixer is not None  # Mixup pairs samples within a batch: it needs an even size
    global_batch = recipe.batch * world.size
    if drop_last and len(train_set) < global_batch:
        raise DataError(f"--data {data.root}: {len(train_set)} training images, fewer than one global batch "
                        f"({global_batch}) with mixup/cutmix")
    sampler = None
    if world.size > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world.size, rank=world.rank,
                                                      shuffle=True, seed=seed, drop_last=drop_last)
    loader = make_loader(train_set, recipe.batch, recipe.workers, shuffle=True, sampler=sampler,
                         drop_last=drop_last, seed=seed)
    steps_per_epoch = len(loader)
    lr = recipe.peak_lr(global_batch)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    net: torch.nn.Module = model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    log_path = None
    if out_dir is not None and world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "log.jsonl"
        log_path.write_text("", encoding="utf-8")
    records = []
    step = 0
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        net.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss_sum, n_batches = 0.0, 0
        for x, y in _batches(loader, world.device):
            scheduler.step_update(step)
            if mixer is not None:
                x, y = mixer(x, y)
            with autocast(world.device):
                loss = criterion(net(x), y)
            if not torch.isfinite(loss):
                raise RunError(f"fine-tuning loss is {loss.item()} at epoch {epoch + 1} (seed {seed}); lower --blr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
            optimizer.step()
            loss_sum += float(loss.detach())
            n_batches += 1
            step += 1
        loss_sum, n_batches = _sum([loss_sum, float(n_batches)], world)
        acc = top1(model, data, img_size, recipe, world)
        record = {"seed": seed, "epoch": epoch + 1, "train_loss": round(loss_sum / max(n_batches, 1), 5),
                  "test_top1": round(acc, 4), "lr": optimizer.param_groups[-1]["lr"],
                  "seconds": round(time.perf_counter() - t0, 2)}
        records.append(record)
        if world.main and log:
            print(json.dumps(record), flush=True)
        if log_path is not None:
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    if out_dir is not None and world.main:
        save_classifier(model, encoder, data, img_size, out_dir / "model.safetensors")
    return {"seed": seed, "top1": records[-1]["test_top1"], "epochs": records, "peak_lr": lr,
            "steps_per_epoch": steps_per_epoch}


def save_classifier(model: torch.nn.Module, encoder: Encoder, data: LabeledSet, img_size: int, path: Path) -> None:
    """The classifier in timm format: ``timm.create_model(name, num_classes=C, img_size=S,
    global_pool='avg')`` loads it strictly; the JSON beside it says so."""
    from safetensors.torch import save

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"format": "pt", "timm_model": encoder.timm_model}))
    meta = {"timm_model": encoder.timm_model, "img_size": img_size, "num_classes": len(data.classes),
            "global_pool": "avg", "classes": data.classes, "encoder": encoder.source,
            "load_with": f"timm.create_model({encoder.timm_model!r}, num_classes={len(data.classes)}, "
                         f"img_size={img_size}, global_pool='avg') then load_state_dict(load_file(path))"}
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(arr.mean()), 4), "std": round(float(arr.std(ddof=1)) if arr.size > 1 else 0.0, 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``smae-eval finetune``: every seed on one split, the floors, the report."""
    recipe = recipe_from_args(args)
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    check_writable_dir(out, "--out")
    world = setup_world()
    data = load_labeled(args)
    encoder = resolve_encoder(args.weights, config=args.config, overrides=args.set, model_name=args.model,
                              img_size=None, init_precision=args.init_precision)
    results = [finetune_one(encoder, data, recipe, seed, out / f"seed_{seed}", world) for seed in seeds]
    tops = [r["top1"] for r in results]
    report = {"mode": "finetune", "weights": args.weights, "encoder": encoder.source, "classes": data.classes,
              **data.split.describe(), "img_size": int(recipe.img_size or encoder.img_size),
              "seeds": seeds, "top1": tops, "top1_summary": summarize(tops),
              "final_train_loss": [r["epochs"][-1]["train_loss"] for r in results],
              "peak_lr": results[0]["peak_lr"], "world_size": world.size, "recipe": asdict(recipe),
              "floors": floors(data.paths, data.labels, data.split, size=args.floor_size, batch=args.batch,
                               workers=args.workers) if world.main else None,
              "out": str(out)}
    if world.main:
        atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    if world.size > 1:
        dist.destroy_process_group()
    return report


__all__ = ["Recipe", "add_arguments", "classifier", "finetune_one", "param_groups", "run", "summarize"]
