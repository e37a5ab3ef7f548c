"""Learning rate and training progress as pure functions of the optimizer step.

Stateless on purpose: a resumed run (any world size) recomputes the same values from
the step counter, so no scheduler state has to live in the checkpoint.
"""
from __future__ import annotations

import math

from selectivemae_ds.config import TrainConfig
from selectivemae_ds.models.methods import get_spec


def peak_lr(cfg: TrainConfig) -> float:
    """The peak learning rate of the paper's rule.

    lr = blr * global_batch / 256 (MAE's linear scaling), times the method's
    ``lr_scale`` when ``optim.scale_by_decode`` is on: decode_ratio / mask_ratio for
    SelectiveMAE (0.25 / 0.85, the paper) and CrossMAE (0.25 / 0.75, its
    main_pretrain.py), 1 for MAE. The loss covers only the decoded fraction of the
    masked patches, so the lr is lowered in proportion. ``optim.lr > 0`` replaces the rule.
    """
    if cfg.optim.lr > 0.0:
        return cfg.optim.lr
    lr = cfg.optim.blr * cfg.train.global_batch / 256.0
    if cfg.optim.scale_by_decode:
        lr *= get_spec(cfg.model.method).lr_scale(cfg.method_cfg)
    return lr


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then half-cosine to ``min_lr``.

    Warmup reaches ``peak`` at the end of step ``warmup_steps - 1`` (MAE's per-iteration
    form: lr = peak * (step + 1) / warmup), so step 0 never runs with lr 0.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def progress_at(step: int, total_steps: int) -> float:
    """Fraction of training done before ``step`` in [0, 1): drives e.g. the PSTS stage (near/far/random)."""
    return min(max(step / max(1, total_steps), 0.0), 1.0)

