"""SimMIM (Xie et al. 2022): the encoder sees the whole sequence, masked patches as a learned token.

Random block masking: the image is cut into square blocks of `mask_block` x
`mask_block` patches (2 x 2 = 32 px at patch 16, SimMIM's `MASK_PATCH_SIZE`), and
ceil(blocks * mask_ratio) random blocks are masked (SimMIM: 0.6). The encoder runs
over all 1 + N tokens with the masked patches' embeddings replaced by the mask
token (position added after); a linear head (SimMIM's 1x1-conv decoder, per token)
maps each masked token to its patch's pixels; the loss is the mean L1 over the
masked pixels (`loss = "l2"` for squared error).

`MIMHead` (this method's `model.decoder`) holds the mask token and the pixel head;
CtxMIM (`ctxmim.py`) shares both and adds a second, unmasked branch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selectivemae_ds.errors import ConfigError

from ..config import ENCODER_PRESETS, ModelConfig
from ..flops import encoder_forward_flops
from ..patches import gather_tokens
from .base import MethodSpec, Selection, StepTensors, check_choice, check_ratio, pixel_targets
from .registry import register

if TYPE_CHECKING:
    from ..pretrain import PretrainModel

DISTANCES = ("l1", "l2")


@dataclass
class SimMIMConfig:
    """The `[simmim]` section."""

    mask_ratio: float = 0.6
    """Fraction of mask blocks hidden (SimMIM: 0.6); rounded up to whole blocks."""
    mask_block: int = 2
    """Side of a mask block in patches (2 = SimMIM's 32 px blocks at patch 16); must divide the patch grid."""
    loss: str = "l1"
    """Distance between prediction and target pixels: l1 (SimMIM) or l2 (mean squared error)."""


class MIMHead(nn.Module):
    """The learned mask token and the linear head from an encoder token to its patch's pixels."""

    def __init__(self, encoder_dim: int, patch_pixels: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder_dim))
        self.head = nn.Linear(encoder_dim, patch_pixels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # SimMIM's init of the mask token

    def mask(self, patches: Tensor, target_idx: Tensor) -> Tensor:
        """(B, N, D) embeddings with the rows `target_idx` (B, T) replaced by the mask token."""
        hidden = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
        hidden.scatter_(1, target_idx, True)
        return torch.where(hidden.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)


def distance(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """Per-sample mean distance of (B, K, P) tensors -> (B,) fp32 (l1 or squared l2)."""
    diff = a.float() - b.float()
    per_pixel = diff.abs() if kind == "l1" else diff.pow(2)
    return per_pixel.mean(dim=(1, 2))


def block_grid(num_patches: int, block: int) -> tuple[int, int]:
    """(patch grid side, block grid side) for N patches and blocks of `block` patches."""
    grid = math.isqrt(num_patches)
    return grid, grid // block


@register
class SimMIM(MethodSpec):
    """Block-masked full-sequence encoder + linear pixel head, L1 on masked pixels."""

    name = "simmim"
    config_cls: Any = SimMIMConfig
    ratio_keys = ("mask_ratio", "mask_ratio")
    default_grad_clip = 5.0  # SimMIM's TRAIN.CLIP_GRAD

    def counts(self, cfg: SimMIMConfig, num_patches: int) -> tuple[int, int]:
        """targets = ceil(blocks * mask_ratio) whole blocks of mask_block^2 patches; visible = the rest."""
        _grid, side = block_grid(num_patches, cfg.mask_block)
        masked_blocks = math.ceil(side * side * cfg.mask_ratio - 1e-9)
        targets = masked_blocks * cfg.mask_block ** 2
        return num_patches - targets, targets

    def check(self, cfg: SimMIMConfig) -> None:
        """ConfigError naming the `<name>.*` key."""
        check_ratio(self.name, "mask_ratio", cfg.mask_ratio)
        check_choice(self.name, "loss", cfg.loss, DISTANCES)
        if cfg.mask_block < 1:
            raise ConfigError(f"{self.name}.mask_block: must be >= 1 patch, got {cfg.mask_block}")

    def validate(self, cfg: Any, model_cfg: ModelConfig) -> None:
        """The base checks, after: `mask_block` divides the patch grid (whole blocks only, as SimMIM)."""
        if isinstance(cfg, self.config_cls):
            self.check(cfg)
            grid = math.isqrt(model_cfg.num_patches())
            if grid % cfg.mask_block:
                raise ConfigError(f"{self.name}.mask_block: {cfg.mask_block} does not divide the {grid} x {grid} "
                                  f"patch grid (model.img_size / patch size)")
        super().validate(cfg, model_cfg)

    def build_decoder(self, cfg: Any, model_cfg: ModelConfig, encoder_dim: int, grid: int) -> nn.Module:
        """`MIMHead`: mask token + linear pixel head (no decoder blocks)."""
        return MIMHead(encoder_dim, model_cfg.resolved_patch_size() ** 2 * 3)

    def select(self, model: PretrainModel, imgs: Tensor, patches: Tensor, progress: float | Tensor) -> Selection:
        """Random blocks per sample: target_idx = the masked patches, visible_idx = the others (both ascending)."""
        cfg = model.method_cfg
        b, n = patches.shape[:2]
        grid, side = block_grid(n, cfg.mask_block)
        masked_blocks = model.num_targets // cfg.mask_block ** 2
        chosen = torch.rand(b, side * side, device=patches.device).argsort(dim=1)[:, :masked_blocks]
        blocks = torch.zeros(b, side * side, dtype=torch.bool, device=patches.device)
        blocks.scatter_(1, chosen, True)
        k = cfg.mask_block
        hidden = blocks.view(b, side, 1, side, 1).expand(b, side, k, side, k).reshape(b, n)
        order = hidden.to(torch.int8).argsort(dim=1, descending=True, stable=True)
        # Stable: the masked patches first, then the others, each in ascending index order.
        return Selection(order[:, model.num_targets:], order[:, :model.num_targets], None, {}, {})

    def masked_branch(self, model: PretrainModel, imgs: Tensor, patches: Tensor,
                      sel: Selection) -> tuple[Tensor, dict[str, Tensor]]:
        """L_Re per sample (B,) and the picture/test details of the masked branch."""
        cfg = model.method_cfg
        latent = model.encoder.forward_all(model.decoder.mask(patches, sel.target_idx))[:, 1:]
        pred = model.decoder.head(gather_tokens(latent, sel.target_idx)).float()
        target, mean, std = pixel_targets(imgs, sel.target_idx, model.patch_size, model.model_cfg.norm_pix_loss)
        details = {"visible_idx": sel.visible_idx, "target_idx": sel.target_idx, "pred": pred,
                   "pred_pixels": pred * std + mean, "target": target}
        return distance(pred, target, cfg.loss), details

    def run(self, model: PretrainModel, imgs: Tensor, progress: float | Tensor) -> StepTensors:
        """Block masking, one full-sequence encoder pass with mask tokens, L_Re on the masked pixels."""
        patches = model.encoder.embed_patches(imgs)
        sel = self.select(model, imgs, patches, progress)
        per_sample, details = self.masked_branch(model, imgs, patches, sel)
        return StepTensors(per_sample, {}, {}, details)

    def forward_flops(self, cfg: Any, model_cfg: ModelConfig) -> float:
        """Patch embedding (N), the encoder on 1 + N tokens, the head on the T masked tokens."""
        return self.mim_flops(cfg, model_cfg, encoder_passes=1, head_tokens_extra=0)

    def mim_flops(self, cfg: Any, model_cfg: ModelConfig, encoder_passes: int, head_tokens_extra: int) -> float:
        """Patch embedding once, `encoder_passes` full-sequence passes, the head on T + `head_tokens_extra` tokens."""
        dim, depth, _heads, _patch = ENCODER_PRESETS[model_cfg.size]
        pixels = model_cfg.resolved_patch_size() ** 2 * 3
        n = model_cfg.num_patches()
        _visible, targets = self.counts(cfg, n)
        flops = 2.0 * n * pixels * dim
        flops += encoder_passes * encoder_forward_flops(dim, depth, 1 + n)
        flops += 2.0 * (targets + head_tokens_extra) * dim * pixels
        return flops
