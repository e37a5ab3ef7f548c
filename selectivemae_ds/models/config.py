"""Typed configuration of the architecture shared by every pretraining method.

`ModelConfig` is the `[model]` section: which method, which encoder, and the
shape of the decoder. Everything that belongs to one method (its mask and
decode ratios, its selection rule, its options) lives in that method's own
config dataclass and TOML section (`[selectivemae]`, `[mae]`, `[crossmae]`;
see `selectivemae_ds.models.methods`). `validate()` raises `ConfigError`
(a `ValueError`) with a message that names the key with its section prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from selectivemae_ds.errors import ConfigError

SIZES: tuple[str, ...] = ("tiny", "small", "base", "large", "huge")
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "flash")

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

# Decoder (width, heads) when `decoder_dim` / `decoder_heads` are None: the public
# SelectiveMAE and CrossMAE code (`mae_vit_small_patch16_dec512d8b` builds a 256-wide,
# 8-head decoder for ViT-S; 512 / 16 for B, L and H, as MAE). Tiny is not in the
# public code; it follows ViT-S.
DECODER_PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (256, 8),
    "small": (256, 8),
    "base": (512, 16),
    "large": (512, 16),
    "huge": (512, 16),
}


@dataclass
class ModelConfig:
    """The `[model]` section: which method, which encoder, which decoder shape.

    Fields with ``metadata={"resume": "fixed"}`` fix the parameter shapes: a resume must
    keep them (``selectivemae_ds.config.fixed_on_resume``)."""

    method: str = field(default="selectivemae", metadata={"resume": "fixed"})
    """Pretraining method, a name in the method registry (`selectivemae`, `mae`,
    `crossmae`; see docs/model.md). Its options live in the section of that name."""
    size: str = field(default="base", metadata={"resume": "fixed"})
    """Encoder size: tiny, small, base, large (patch 16) or huge (patch 14)."""
    img_size: int = field(default=224, metadata={"resume": "fixed"})
    """Square input side in pixels; must be a multiple of the patch size."""
    patch_size: int | None = field(default=None, metadata={"resume": "fixed"})
    """Patch side in pixels; None means 16, or 14 for `huge` (as MAE)."""
    decoder_depth: int | None = field(default=None, metadata={"resume": "fixed"})
    """Decoder blocks; None means the method's default (12 selectivemae/crossmae, 8 mae)."""
    decoder_dim: int | None = field(default=None, metadata={"resume": "fixed"})
    """Decoder width; None means the size's preset (public code: 256 for ViT-S, 512 for B/L/H)."""
    decoder_heads: int | None = field(default=None, metadata={"resume": "fixed"})
    """Decoder attention heads; None means the size's preset (8 for ViT-S, 16 for B/L/H)."""
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
        from .methods import get_spec

        return get_spec(self.method).default_decoder_depth

    def resolved_decoder_dim(self) -> int:
        """The decoder width after applying the size's preset."""
        if self.decoder_dim is not None:
            return self.decoder_dim
        return DECODER_PRESETS.get(self.size, DECODER_PRESETS["base"])[0]

    def resolved_decoder_heads(self) -> int:
        """The decoder head count after applying the size's preset."""
        if self.decoder_heads is not None:
            return self.decoder_heads
        return DECODER_PRESETS.get(self.size, DECODER_PRESETS["base"])[1]

    def num_patches(self) -> int:
        """Patches per image, N = (img_size / patch)^2."""
        return (self.img_size // self.resolved_patch_size()) ** 2

    def validate(self) -> None:
        """Raise ConfigError naming the offending `model.*` key."""
        from .methods import get_spec

        get_spec(self.method)  # unknown method: ConfigError naming model.method
        if self.size not in SIZES:
            raise ConfigError(f"model.size: unknown size {self.size!r} (choose from {', '.join(SIZES)})")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(
                f"model.attn_impl: unknown attention {self.attn_impl!r} (choose from {', '.join(ATTN_IMPLS)})"
            )
        if self.patch_size is not None and self.patch_size < 1:
            raise ConfigError(f"model.patch_size: must be >= 1, got {self.patch_size}")
        patch = self.resolved_patch_size()
        if self.img_size < 1 or self.img_size % patch != 0:
            raise ConfigError(
                f"model.img_size: must be a positive multiple of the patch size {patch}, got {self.img_size}"
            )
        if self.decoder_depth is not None and self.decoder_depth < 1:
            raise ConfigError(f"model.decoder_depth: must be >= 1, got {self.decoder_depth}")
        dim, heads = self.resolved_decoder_dim(), self.resolved_decoder_heads()
        if dim < 1:
            raise ConfigError(f"model.decoder_dim: must be >= 1, got {dim}")
        if heads < 1 or dim % heads != 0:
            raise ConfigError(f"model.decoder_heads: must divide model.decoder_dim ({dim}), got {heads}")
        # The 2-D sin-cos table splits the width in four (sin/cos x rows/cols).
        if dim % 4 != 0:
            raise ConfigError(f"model.decoder_dim: must be a multiple of 4 (2-D sin-cos table), got {dim}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path: must be in [0, 1), got {self.drop_path}")
