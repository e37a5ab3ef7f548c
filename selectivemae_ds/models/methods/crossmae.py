"""CrossMAE (Fu et al., "Rethinking Patch Dependence for Masked Autoencoders", 2024).

Random masking (0.75) as MAE, but only a random part of the masked patches is
reconstructed (decode_ratio 0.25 of all patches, CrossMAE's `kept_mask_ratio`)
by a 12-block cross-attention decoder whose queries never attend to each other.
Its official `main_pretrain.py` scales the lr by kept_mask_ratio / mask_ratio.
With `weight_fm`, each decoder block reads its own learned mix of the encoder's
block outputs (and, with `use_input`, of its input tokens): CrossMAE's feature fusion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from selectivemae_ds.errors import ConfigError

from ..config import ENCODER_PRESETS, ModelConfig
from ..token_selection import floor_count
from .base import MethodSpec, check_ratio
from .registry import register


@dataclass
class CrossMAEConfig:
    """The `[crossmae]` section."""

    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder (CrossMAE: 0.75)."""
    decode_ratio: float = 0.25
    """Fraction of all N patches reconstructed, chosen at random among the masked ones
    (CrossMAE's `kept_mask_ratio`; its ViT-B/L recipes: 0.25)."""
    weight_fm: bool = field(default=False, metadata={"resume": "fixed"})
    """Feature fusion: decoder block j reads a learned mix of every encoder block's
    output instead of the last one (CrossMAE's `--weight_fm`, on in its recipes)."""
    use_input: bool = field(default=False, metadata={"resume": "fixed"})
    """With weight_fm: the encoder's input tokens are one more map in the mix
    (CrossMAE's `--use_input`, on in its recipes)."""


@register
class CrossMAE(MethodSpec):
    """Random masking + cross-attention decoder on a random partial target set."""

    name = "crossmae"
    config_cls = CrossMAEConfig
    default_decoder_depth = 12
    decoder_kind = "cross"

    def counts(self, cfg: CrossMAEConfig, num_patches: int) -> tuple[int, int]:
        """visible = floor(N(1 - mask_ratio)), targets = floor(N * decode_ratio)."""
        return floor_count(num_patches, 1.0 - cfg.mask_ratio), floor_count(num_patches, cfg.decode_ratio)

    def check(self, cfg: CrossMAEConfig) -> None:
        """ConfigError naming the `crossmae.*` key."""
        check_ratio(self.name, "mask_ratio", cfg.mask_ratio)
        check_ratio(self.name, "decode_ratio", cfg.decode_ratio, closed_top=True)
        if cfg.use_input and not cfg.weight_fm:
            raise ConfigError("crossmae.use_input: only applies with crossmae.weight_fm = true")

    def fused_layers(self, cfg: CrossMAEConfig, model_cfg: ModelConfig) -> int:
        """Encoder maps in the fusion (0 = no fusion): every block, plus the input with use_input."""
        if not cfg.weight_fm:
            return 0
        return ENCODER_PRESETS[model_cfg.size][1] + int(cfg.use_input)

    def cross_decoder_options(self, cfg: CrossMAEConfig, model_cfg: ModelConfig) -> dict[str, Any]:
        """The fusion's input count for the decoder (0 = no fusion)."""
        return {"fuse_layers": self.fused_layers(cfg, model_cfg)}

    def encode(self, model: Any, patches: Tensor, visible_idx: Tensor) -> Tensor:
        """The last layer, or every layer stacked (B, 1 + V, D, K) for the fusion."""
        cfg: CrossMAEConfig = model.method_cfg
        if not cfg.weight_fm:
            return super().encode(model, patches, visible_idx)
        return model.encoder.forward_visible_layers(patches, visible_idx, with_input=cfg.use_input)

    def lr_scale(self, cfg: CrossMAEConfig) -> float:
        """decode_ratio / mask_ratio, as CrossMAE's main_pretrain.py (kept_mask_ratio / mask_ratio)."""
        return cfg.decode_ratio / cfg.mask_ratio

    def forward_flops(self, cfg: CrossMAEConfig, model_cfg: ModelConfig) -> float:
        """The base count; the fusion adds a K-way mix and a decoder_embed per decoder block."""
        flops = super().forward_flops(cfg, model_cfg)
        layers = self.fused_layers(cfg, model_cfg)
        if layers:
            dim = ENCODER_PRESETS[model_cfg.size][0]
            tokens = 1 + self.counts(cfg, model_cfg.num_patches())[0]
            dec_depth = model_cfg.resolved_decoder_depth()
            flops += 2.0 * tokens * dim * layers * dec_depth  # the mix: (M, De, K) x (K, depth)
            flops += 2.0 * tokens * dim * model_cfg.resolved_decoder_dim() * (dec_depth - 1)  # depth projections, not 1
        return flops
