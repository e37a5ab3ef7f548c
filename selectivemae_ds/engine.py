"""DeepSpeed setup: parameter groups, the merge of TrainConfig into the DeepSpeed dict, initialize.

The DeepSpeed JSON holds systems settings only (ZeRO stage, bf16, buckets, offload).
Batch geometry, optimizer and clipping come from the experiment TOML; the engine fills
them in and refuses a JSON that says something else, naming both sides, so one run
never has two sources of truth.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selectivemae_ds.config import TrainConfig
from selectivemae_ds.errors import ConfigError
from selectivemae_ds.schedules import peak_lr

# Keys the engine owns; a JSON may repeat them only with the same value.
FILLED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "gradient_clipping")
# Keys a JSON must not carry at all: the optimizer and the schedule are built from the TOML.
REFUSED_KEYS = {"optimizer": "optim.* (AdamW is built from the TOML)",
                "scheduler": "optim.* (the lr schedule is per step from the TOML)"}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for matrices, none for norms, biases and the model's listed names.

    ``ndim <= 1`` covers every norm weight and bias (timm's rule, which MAE, CrossMAE and
    the public SelectiveMAE code use); ``model.no_weight_decay()`` names any further
    exemptions of the method (none for the built-ins: their cls/mask tokens are decayed,
    as in the reference code).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def load_ds_json(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read a DeepSpeed JSON (empty dict when no file is given)."""
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed_config {path}: cannot read it as JSON ({e})") from e


def merge_ds_config(ds: dict[str, Any], cfg: TrainConfig, world_size: int, *, source: str = "DeepSpeed JSON",
                    load_universal: bool = False) -> dict[str, Any]:
    """Fill the TOML-owned keys into a copy of ``ds``; ConfigError when the JSON contradicts the TOML.

    The skip of non-finite steps relies on the ZeRO optimizer's overflow check (it
    discards a step whose gradient norm is inf/NaN), so ZeRO stage >= 1 is required and
    ``bf16.check_grad_overflow`` must stay on.
    """
    accum = cfg.train.check_world_size(world_size)
    wanted: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (cfg.train.micro_batch, "train.micro_batch"),
        "gradient_accumulation_steps": (accum, f"train.global_batch / (train.micro_batch x {world_size} ranks)"),
        "train_batch_size": (cfg.train.global_batch, "train.global_batch"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
    }
    out = copy.deepcopy(ds)
    for key, owner in REFUSED_KEYS.items():
        if key in out:
            raise ConfigError(f"{source}: remove \"{key}\"; it contradicts the TOML, which sets {owner}")
    for key in FILLED_KEYS:
        value, owner = wanted[key]
        if key in out and out[key] != "auto" and out[key] != value:
            raise ConfigError(
                f"{source}: \"{key}\": {out[key]!r} contradicts {owner} = {value!r} from the TOML; "
                f"remove \"{key}\" from the JSON (the engine fills it)"
            )
        out[key] = value
    stage = int(out.get("zero_optimization", {}).get("stage", 0))
    if stage < 1:
        raise ConfigError(
            f"{source}: \"zero_optimization.stage\" is {stage}; use 1, 2 or 3 (the non-finite step skip "
            "and the sharded checkpoints rely on a ZeRO optimizer)"
        )
    if out.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{source}: \"fp16\" is not supported; use \"bf16\" (no loss scaling needed)")
    if out.get("bf16", {}).get("check_grad_overflow", True) is False:
        raise ConfigError(f"{source}: \"bf16.check_grad_overflow\" must stay true (it skips non-finite steps)")
    out.setdefault("steps_per_print", 1 << 30)  # the trainer prints; DeepSpeed's own lines would duplicate it
    out.setdefault("wall_clock_breakdown", False)
    # The optimizer is a torch AdamW built here, not one of DeepSpeed's own.
    out.setdefault("zero_allow_untested_optimizer", True)
    if load_universal:
        out.setdefault("checkpoint", {})["load_universal"] = True
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (0.9, 0.95) over the two groups; the fused CUDA kernel on GPU.

    A torch optimizer works on both the CPU and the CUDA accelerator (DeepSpeed's
    FusedAdam needs a CUDA build); ZeRO wraps it and feeds it fp32 master partitions.
    """
    return torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=peak_lr(cfg),
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=device.type == "cuda",
    )


def initialize(model: nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], device: torch.device) -> Any:
    """``deepspeed.initialize`` with the merged config and our AdamW; returns the engine."""
    import deepspeed

    optimizer = build_optimizer(model, cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def set_lr(engine: Any, lr: float) -> None:
    """Set the learning rate of every param group (the schedule is computed by the trainer)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
