"""Learning rate and training progress as pure functions of the optimizer step.

Stateless on purpose: a resumed run (any world size) recomputes the same values from
the step counter, so no scheduler state has to live in the checkpoint.
"""
from __future__ import annotations

import math

from selectivemae_ds.config import TrainConfig


def peak_lr(cfg: TrainConfig) -> float:
    """The peak learning rate of the paper's rule.

    lr = blr * global_batch / 256 (MAE's linear scaling), and for SelectiveMAE also
    times decode_ratio / mask_ratio (0.25 / 0.85): the loss covers only the decoded
    fraction of the masked patches, so the paper lowers the lr in proportion.
    ``optim.lr > 0`` replaces the rule.
    """
    if cfg.optim.lr > 0.0:
        return cfg.optim.lr
    lr = cfg.optim.blr * cfg.train.global_batch / 256.0
    if cfg.optim.scale_by_decode and cfg.model.method == "selectivemae":
        lr *= cfg.masking.decode_ratio / cfg.masking.mask_ratio
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
    """Fraction of training done before ``step`` in [0, 1): drives the PSTS stage (near/far/random)."""
    return min(max(step / max(1, total_steps), 0.0), 1.0)


def psts_stage(progress: float, near_until: float, far_until: float) -> str:
    """The PSTS stage name at ``progress`` (for logs; the model applies the blend itself)."""
    if progress < near_until:
        return "near"
    if progress < far_until:
        return "far"
    return "random"
