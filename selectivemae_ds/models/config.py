"""Typed configuration of the pretraining model and of its token selection.

Two dataclasses, one per TOML section (`[model]`, `[masking]`). Every field
carries a comment saying what it means and where its default comes from
(see docs/model.md for the full table). `validate()` raises `ConfigError`
with a message that names the key with its section prefix, so a user sees
exactly which line of the experiment file to fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from selectivemae_ds.errors import ConfigError

METHODS: tuple[str, ...] = ("selectivemae", "mae", "crossmae")
SIZES: tuple[str, ...] = ("tiny", "small", "base", "large", "huge")
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "flash")
INIT_SELECTS: tuple[str, ...] = ("topk", "softmax")

# Encoder presets: (embed_dim, depth, num_heads, default patch size). They are
# the timm `vit_<size>_patch16_224` / `vit_huge_patch14_224` shapes, which are
# also the MAE paper's ViT-B/L/H (H with patch 14).
ENCODER_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 12, 3, 16),
    "small": (384, 12, 6, 16),
    "base": (768, 12, 12, 16),
    "large": (1024, 24, 16, 16),
    "huge": (1280, 32, 16, 14),
}

# Decoder depth when `decoder_depth` is None: the SelectiveMAE paper (and
# CrossMAE) use 12 cross-attention blocks; MAE uses 8 self-attention blocks.
DEFAULT_DECODER_DEPTH: dict[str, int] = {"selectivemae": 12, "crossmae": 12, "mae": 8}


@dataclass
class ModelConfig:
    """The `[model]` section: which method, which encoder, which decoder.

    Fields with ``metadata={"resume": "fixed"}`` fix the parameter shapes: a resume must
    keep them (``selectivemae_ds.config.fixed_on_resume``)."""

    method: str = field(default="selectivemae", metadata={"resume": "fixed"})
    """Pretraining method: `selectivemae` (PSTS token selection + cross-attention
    decoder on a partial target set), `mae` (random 75% masking, self-attention
    decoder, all masked patches reconstructed) or `crossmae` (random masking,
    cross-attention decoder, random partial reconstruction)."""
    size: str = field(default="base", metadata={"resume": "fixed"})
    """Encoder size: tiny, small, base, large (patch 16) or huge (patch 14)."""
    img_size: int = field(default=224, metadata={"resume": "fixed"})
    """Square input side in pixels; must be a multiple of the patch size."""
    patch_size: int | None = field(default=None, metadata={"resume": "fixed"})
    """Patch side in pixels; None means 16, or 14 for `huge` (as MAE)."""
    decoder_depth: int | None = field(default=None, metadata={"resume": "fixed"})
    """Decoder blocks; None means the method's default (12 selectivemae/crossmae, 8 mae)."""
    decoder_dim: int = field(default=512, metadata={"resume": "fixed"})
    """Decoder width (paper and MAE: 512)."""
    decoder_heads: int = field(default=16, metadata={"resume": "fixed"})
    """Decoder attention heads (MAE: 16)."""
    decoder_self_attn: bool = field(default=False, metadata={"resume": "fixed"})
    """Cross-attention decoders only: add a self-attention layer over the queries
    in every block (CrossMAE's option; the paper's default is off)."""
    norm_pix_loss: bool = True
    """Normalize every target patch by its own mean and std before the MSE (MAE)."""
    attn_impl: str = "sdpa"
    """Attention kernel: `sdpa` (torch scaled_dot_product_attention) or `flash`
    (the flash-attn package; used for bf16/fp16 activations on CUDA)."""
    drop_path: float = 0.0
    """Stochastic depth rate of the encoder (linearly increasing over blocks)."""

    def resolved_patch_size(self) -> int:
        """The patch side after applying the size's default."""
        if self.patch_size is not None:
            return self.patch_size
        return ENCODER_PRESETS[self.size][3] if self.size in ENCODER_PRESETS else 16

    def resolved_decoder_depth(self) -> int:
        """The decoder depth after applying the method's default."""
        if self.decoder_depth is not None:
            return self.decoder_depth
        return DEFAULT_DECODER_DEPTH.get(self.method, 12)

    def num_patches(self) -> int:
        """Patches per image, N = (img_size / patch)^2."""
        return (self.img_size // self.resolved_patch_size()) ** 2

    def validate(self) -> None:
        """Raise ConfigError naming the offending `model.*` key."""
        if self.method not in METHODS:
            raise ConfigError(f"model.method: unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.size not in SIZES:
            raise ConfigError(f"model.size: unknown size {self.size!r} (choose from {', '.join(SIZES)})")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"model.attn_impl: unknown attention {self.attn_impl!r} (choose from {', '.join(ATTN_IMPLS)})")
        if self.patch_size is not None and self.patch_size < 1:
            raise ConfigError(f"model.patch_size: must be >= 1, got {self.patch_size}")
        patch = self.resolved_patch_size()
        if self.img_size < 1 or self.img_size % patch != 0:
            raise ConfigError(f"model.img_size: must be a positive multiple of the patch size {patch}, got {self.img_size}")
        if self.decoder_depth is not None and self.decoder_depth < 1:
            raise ConfigError(f"model.decoder_depth: must be >= 1, got {self.decoder_depth}")
        if self.decoder_dim < 1:
            raise ConfigError(f"model.decoder_dim: must be >= 1, got {self.decoder_dim}")
        if self.decoder_heads < 1 or self.decoder_dim % self.decoder_heads != 0:
            raise ConfigError(
                f"model.decoder_heads: must divide model.decoder_dim ({self.decoder_dim}), got {self.decoder_heads}"
            )
        # The 2-D sin-cos table splits the width in four (sin/cos x rows/cols).
        if self.decoder_dim % 4 != 0:
            raise ConfigError(f"model.decoder_dim: must be a multiple of 4 (2-D sin-cos table), got {self.decoder_dim}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path: must be in [0, 1), got {self.drop_path}")


@dataclass
class MaskingConfig:
    """The `[masking]` section: how many patches the encoder sees and which."""

    mask_ratio: float = 0.85
    """SelectiveMAE: fraction of patches hidden from the encoder (paper: 0.85);
    the encoder sees floor(N * (1 - mask_ratio)) patches."""
    decode_ratio: float = 0.25
    """SelectiveMAE and CrossMAE: fraction of all N patches reconstructed
    (paper: 0.25); the targets are floor(N * decode_ratio) non-visible patches."""
    init_select: str = "topk"
    """PSTS initial set: `topk` (highest HOG scores) or `softmax` (sampled
    without replacement from softmax(standardized score / temperature))."""
    temperature: float = 1.0
    """Temperature of the `softmax` initial selection (higher = more random)."""
    near_until: float = 0.375
    """End of the `near` stage as a fraction of total steps (paper: 300/800 epochs)."""
    far_until: float = 0.75
    """End of the `far` stage as a fraction of total steps (paper: 600/800 epochs);
    `random` runs from here to the end."""
    blend: float = 0.02
    """Width of the linear blend window centred on each stage switch, as a
    fraction of training (the official code blends over a few epochs); 0 = hard switch."""
    mae_mask_ratio: float = 0.75
    """Mask ratio of the `mae` and `crossmae` baselines (MAE, CrossMAE: 0.75)."""
    hog_bins: int = 9
    """Unsigned orientation bins of the HOG histogram (Dalal-Triggs, MaskFeat: 9)."""

    def effective_mask_ratio(self, method: str) -> float:
        """The mask ratio the given method uses."""
        return self.mask_ratio if method == "selectivemae" else self.mae_mask_ratio

    def counts(self, method: str, num_patches: int) -> tuple[int, int]:
        """(visible, targets) per image for `method` with `num_patches` patches.

        visible = floor(N * (1 - m)); targets = floor(N * r) for selectivemae and
        crossmae, and every masked patch (N - visible) for mae.
        """
        n = num_patches
        # The small epsilon keeps e.g. 196 * 0.15 = 29.4 from flooring to 29 vs 28
        # through float error (0.15 is not exact in binary).
        visible = math.floor(n * (1.0 - self.effective_mask_ratio(method)) + 1e-9)
        targets = n - visible if method == "mae" else math.floor(n * self.decode_ratio + 1e-9)
        return visible, targets

    def validate(self, method: str = "selectivemae", num_patches: int | None = None) -> None:
        """Raise ConfigError naming the offending `masking.*` key.

        With `num_patches` (from `ModelConfig.num_patches()`), also check that the
        ratios leave at least one visible and one target patch and that the
        targets fit among the non-visible patches.
        """
        for key in ("mask_ratio", "mae_mask_ratio"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"masking.{key}: must be in (0, 1), got {value}")
        if not 0.0 < self.decode_ratio <= 1.0:
            raise ConfigError(f"masking.decode_ratio: must be in (0, 1], got {self.decode_ratio}")
        if self.init_select not in INIT_SELECTS:
            raise ConfigError(
                f"masking.init_select: unknown selection {self.init_select!r} (choose from {', '.join(INIT_SELECTS)})"
            )
        if not self.temperature > 0.0:
            raise ConfigError(f"masking.temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.blend < 1.0:
            raise ConfigError(f"masking.blend: must be in [0, 1), got {self.blend}")
        if not 0.0 <= self.near_until <= 1.0:
            raise ConfigError(f"masking.near_until: must be in [0, 1], got {self.near_until}")
        if not 0.0 <= self.far_until <= 1.0:
            raise ConfigError(f"masking.far_until: must be in [0, 1], got {self.far_until}")
        # Blend windows are centred on the switches and must not overlap, else
        # the near->far and far->random mixes are not a valid distribution.
        if self.far_until - self.near_until < self.blend:
            raise ConfigError(
                f"masking.far_until: must be >= masking.near_until + masking.blend "
                f"({self.near_until} + {self.blend}), got {self.far_until}"
            )
        if self.hog_bins < 2:
            raise ConfigError(f"masking.hog_bins: must be >= 2, got {self.hog_bins}")
        if num_patches is None:
            return
        visible, targets = self.counts(method, num_patches)
        ratio_key = "masking.mask_ratio" if method == "selectivemae" else "masking.mae_mask_ratio"
        if visible < 1:
            raise ConfigError(
                f"{ratio_key}: leaves no visible patch with {num_patches} patches per image "
                f"(floor({num_patches} * (1 - {self.effective_mask_ratio(method)})) = 0)"
            )
        if visible >= num_patches:
            raise ConfigError(f"{ratio_key}: leaves no masked patch with {num_patches} patches per image")
        if targets < 1:
            raise ConfigError(
                f"masking.decode_ratio: leaves no target patch with {num_patches} patches per image "
                f"(floor({num_patches} * {self.decode_ratio}) = 0)"
            )
        if targets > num_patches - visible:
            raise ConfigError(
                f"masking.decode_ratio: {targets} targets do not fit among the {num_patches - visible} "
                f"non-visible patches (decode_ratio must be <= 1 - {ratio_key.split('.')[1]})"
            )
