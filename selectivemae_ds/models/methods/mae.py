"""MAE (He et al. 2022): random masking, a self-attention decoder over the full sequence.

The encoder sees floor(N(1-0.75)) random patches; the 8-block decoder runs on
all 1 + N tokens (mask tokens in the holes) and every masked patch is in the
loss. lr = blr * batch / 256 (no ratio scaling).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..token_selection import floor_count
from .base import MethodSpec, check_ratio
from .registry import register


@dataclass
class MAEConfig:
    """The `[mae]` section."""

    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder (MAE: 0.75); every hidden patch is reconstructed."""


@register
class MAE(MethodSpec):
    """Random masking + MAE's self-attention decoder (see the module docstring)."""

    name = "mae"
    config_cls = MAEConfig
    default_decoder_depth = 8
    decoder_kind = "self"
    ratio_keys = ("mask_ratio", "mask_ratio")

    def counts(self, cfg: MAEConfig, num_patches: int) -> tuple[int, int]:
        """visible = floor(N(1 - mask_ratio)); targets = every masked patch."""
        visible = floor_count(num_patches, 1.0 - cfg.mask_ratio)
        return visible, num_patches - visible

    def check(self, cfg: MAEConfig) -> None:
        """ConfigError naming the `mae.*` key."""
        check_ratio(self.name, "mask_ratio", cfg.mask_ratio)
