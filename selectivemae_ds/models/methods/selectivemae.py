"""SelectiveMAE: PSTS token selection, a cross-attention decoder on a partial target set.

The paper ("Scaling Efficient Masked Autoencoder Learning on Large Remote Sensing
Dataset", ICCV 2025): the encoder sees floor(N(1-0.85)) patches chosen by PSTS
(HOG-scored initial set, expanded by similarity through near -> far -> random
stages over training); floor(N*0.25) non-visible patches are reconstructed by
12 cross-attention blocks. lr = blr * batch / 256 * decode_ratio / mask_ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from selectivemae_ds.errors import ConfigError

from ..token_selection import (
    STAGE_FAR,
    STAGE_NEAR,
    STAGE_NAMES,
    STAGE_RANDOM,
    SIMILARITY_RULES,
    hog_patch_scores,
    psts_counts,
    psts_select,
)
from .base import MethodSpec, Selection, check_choice, check_ratio
from .registry import register

PICK_RULES: tuple[str, ...] = ("topk", "softmax", "random")


@dataclass
class SelectiveMAEConfig:
    """The `[selectivemae]` section: ratios and the PSTS options (sources in docs/model.md)."""

    mask_ratio: float = 0.85
    """Fraction of patches hidden from the encoder (paper: 0.85); the encoder sees
    floor(N * (1 - mask_ratio)) patches."""
    decode_ratio: float = 0.25
    """Fraction of all N patches reconstructed (paper: 0.25); the targets are
    floor(N * decode_ratio) non-visible patches."""
    init_select: str = "topk"
    """PSTS initial set: `topk` (highest HOG scores; the paper), `softmax` (sampled
    without replacement from softmax(standardized score / init_temperature)) or
    `random` (uniform; what the public code's zero HOG score amounts to)."""
    init_temperature: float = 1.0
    """Temperature of the `softmax` initial selection (higher = more random)."""
    target_select: str = "topk"
    """Reconstruction targets among the non-visible patches: `topk` (highest HOG
    scores; the paper), `softmax` (as init_select, with target_temperature) or
    `random` (uniform; the public code in effect)."""
    target_temperature: float = 1.0
    """Temperature of the `softmax` target selection."""
    similarity: str = "paper"
    """How an unselected patch's similarity to the selected set is measured in the
    expansion: `paper` (Eq. 3-4: its nearest selected patch in the near stage, its
    farthest in the far stage), `max` (its nearest selected patch in both stages, as
    the public code) or `mean` (mean cosine to the set)."""
    with_pos: bool = False
    """Compare patch embeddings plus the encoder's position embeddings (the public
    code) instead of patch embeddings alone (the paper's text)."""
    near_until: float = 0.375
    """End of the `near` stage as a fraction of total steps (paper: 300/800 epochs)."""
    far_until: float = 0.75
    """End of the `far` stage as a fraction of total steps (paper: 600/800 epochs);
    `random` runs from here to the end."""
    blend: float = 0.02
    """Width of the linear blend window centred on each stage switch, as a
    fraction of training (the official code blends over a few epochs); 0 = hard switch."""
    hog_bins: int = 9
    """Unsigned orientation bins of the HOG histogram (Dalal-Triggs, MaskFeat: 9)."""


@register
class SelectiveMAE(MethodSpec):
    """PSTS selection + cross-attention decoder (see the module docstring)."""

    name = "selectivemae"
    config_cls = SelectiveMAEConfig
    default_decoder_depth = 12
    decoder_kind = "cross"
    logged_stats = ("psts_stage_id", "stage_near", "stage_far", "stage_random")
    # Deviation: the public code does not clip (its fp16 loss scaler skips overflowing
    # steps); 1.0 is this project's earlier default, kept as a guard against loss spikes in
    # long bf16 runs (not measured). optim.grad_clip = 0 runs it the public code's way.
    default_grad_clip = 1.0

    def counts(self, cfg: SelectiveMAEConfig, num_patches: int) -> tuple[int, int]:
        """visible = floor(N(1 - mask_ratio)), targets = floor(N * decode_ratio)."""
        initial, grow1, grow2, targets = psts_counts(num_patches, cfg)
        return initial + grow1 + grow2, targets

    def check(self, cfg: SelectiveMAEConfig) -> None:
        """ConfigError naming the `selectivemae.*` key."""
        s = self.name
        check_ratio(s, "mask_ratio", cfg.mask_ratio)
        check_ratio(s, "decode_ratio", cfg.decode_ratio, closed_top=True)
        check_choice(s, "init_select", cfg.init_select, PICK_RULES)
        check_choice(s, "target_select", cfg.target_select, PICK_RULES)
        check_choice(s, "similarity", cfg.similarity, tuple(SIMILARITY_RULES))
        for key in ("init_temperature", "target_temperature"):
            if not getattr(cfg, key) > 0.0:
                raise ConfigError(f"{s}.{key}: must be > 0, got {getattr(cfg, key)}")
        if not 0.0 <= cfg.blend < 1.0:
            raise ConfigError(f"{s}.blend: must be in [0, 1), got {cfg.blend}")
        for key in ("near_until", "far_until"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ConfigError(f"{s}.{key}: must be in [0, 1], got {getattr(cfg, key)}")
        # Blend windows are centred on the switches and must not overlap, else
        # the near->far and far->random mixes are not a valid distribution.
        if cfg.far_until - cfg.near_until < cfg.blend:
            raise ConfigError(
                f"{s}.far_until: must be >= {s}.near_until + {s}.blend "
                f"({cfg.near_until} + {cfg.blend}), got {cfg.far_until}"
            )
        if cfg.hog_bins < 2:
            raise ConfigError(f"{s}.hog_bins: must be >= 2, got {cfg.hog_bins}")

    def select(self, model: Any, imgs: Tensor, patches: Tensor, progress: float | Tensor) -> Selection:
        """HOG scores, then PSTS on the (detached) patch embeddings [+ positions]."""
        cfg: SelectiveMAEConfig = model.method_cfg
        scores = hog_patch_scores(imgs, model.patch_size, cfg.hog_bins)
        emb = patches + model.encoder.pos_embed[:, 1:, :].to(patches.dtype) if cfg.with_pos else patches
        visible_idx, target_idx, stage = psts_select(scores, emb, progress, cfg)
        stats = {
            "psts_stage_id": stage.float().mean(),
            "stage_near": (stage == STAGE_NEAR).float().mean(),
            "stage_far": (stage == STAGE_FAR).float().mean(),
            "stage_random": (stage == STAGE_RANDOM).float().mean(),
        }
        return Selection(visible_idx, target_idx, scores, stats, {"stage": stage})

    def lr_scale(self, cfg: SelectiveMAEConfig) -> float:
        """decode_ratio / mask_ratio (0.25 / 0.85): the loss covers a fraction of the masked patches."""
        return cfg.decode_ratio / cfg.mask_ratio

    def log_fields(self, cfg: SelectiveMAEConfig, progress: float) -> dict[str, Any]:
        """The PSTS stage the schedule prescribes at `progress` (the model blends around switches)."""
        return {"psts_stage": psts_stage_name(progress, cfg.near_until, cfg.far_until)}


def psts_stage_name(progress: float, near_until: float, far_until: float) -> str:
    """The PSTS stage name at `progress` (for logs; the model applies the blend itself)."""
    if progress < near_until:
        return STAGE_NAMES[STAGE_NEAR]
    if progress < far_until:
        return STAGE_NAMES[STAGE_FAR]
    return STAGE_NAMES[STAGE_RANDOM]

