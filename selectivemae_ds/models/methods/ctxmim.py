"""CtxMIM (Zhang, Liu, Wang, "Context-Enhanced Masked Image Modeling for Remote Sensing
Image Understanding", section 3) on our ViT.

Two branches through the same encoder and the same linear head (`MIMHead`):
- masked branch: SimMIM's (block masking, mask tokens, full sequence):
  L_Re = distance over the masked pixels;
- context branch: the same image unmasked (no mask token anywhere), predicting
  every patch's pixels: L_Pr = distance over all pixels;
- consistency: L_Cc = distance between the masked branch's reconstruction and the
  context branch's prediction on the masked patches.

L = weight_re L_Re + weight_pr L_Pr + weight_cc L_Cc (defaults 1). The paper does
not say which side of L_Cc is detached. Default `cc_detach = "context"`: the context
branch saw the whole image, so its prediction is the better-informed one; detaching
it makes L_Cc pull the masked branch's reconstruction toward it, while the context
branch is trained by L_Pr alone and is not pulled toward the masked branch's
guesses (which would blur its prediction). "masked" detaches the other side,
"none" lets the gradient through both.

Logged as `loss_re`, `loss_pr`, `loss_cc` (weighted). The picture gets a
`panel_context` column: the context branch's whole-image prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import torch
from torch import Tensor

from selectivemae_ds.errors import ConfigError

from ..config import ModelConfig
from ..patches import gather_tokens
from .base import StepTensors, check_choice, pixel_targets
from .registry import register
from .simmim import SimMIM, SimMIMConfig, distance

DETACH = ("context", "masked", "none")


@dataclass
class CtxMIMConfig(SimMIMConfig):
    """The `[ctxmim]` section: SimMIM's masking and distance, plus the context branch."""

    weight_re: float = 1.0
    """Weight of L_Re, the masked branch's reconstruction of the masked pixels."""
    weight_pr: float = 1.0
    """Weight of L_Pr, the context branch's prediction of every pixel of the unmasked image."""
    weight_cc: float = 1.0
    """Weight of L_Cc, the consistency of the two branches on the masked patches."""
    cc_detach: str = "context"
    """Which side of L_Cc gets no gradient: context (default; see the module docstring), masked or none."""


def consistency(pred_masked: Tensor, pred_context: Tensor, detach: str, kind: str) -> Tensor:
    """L_Cc per sample (B,): distance of (B, T, P) predictions on the masked patches, one side detached."""
    if detach == "context":
        pred_context = pred_context.detach()
    elif detach == "masked":
        pred_masked = pred_masked.detach()
    return distance(pred_masked, pred_context, kind)


@register
class CtxMIM(SimMIM):
    """SimMIM's masked branch + an unmasked context branch + their consistency."""

    name = "ctxmim"
    config_cls = CtxMIMConfig
    loss_terms = ("re", "pr", "cc")

    def check(self, cfg: CtxMIMConfig) -> None:
        """SimMIM's checks, the detach choice, and weights >= 0 (not all zero)."""
        super().check(cfg)
        check_choice(self.name, "cc_detach", cfg.cc_detach, DETACH)
        for key in ("weight_re", "weight_pr", "weight_cc"):
            value = getattr(cfg, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"{self.name}.{key}: must be a finite number >= 0, got {value}")
        if cfg.weight_re == cfg.weight_pr == cfg.weight_cc == 0.0:
            raise ConfigError(f"{self.name}.weight_re: the three loss weights are all 0")

    def run(self, model: Any, imgs: Tensor, progress: float | Tensor) -> StepTensors:
        """Masked branch (L_Re), context branch on the unmasked sequence (L_Pr), consistency (L_Cc)."""
        cfg: CtxMIMConfig = model.method_cfg
        patches = model.encoder.embed_patches(imgs)
        sel = self.select(model, imgs, patches, progress)
        re, details = self.masked_branch(model, imgs, patches, sel)
        context = model.decoder.head(model.encoder.forward_all(patches)[:, 1:]).float()  # (B, N, P)
        every = torch.arange(model.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        target, mean, std = pixel_targets(imgs, every, model.patch_size, model.model_cfg.norm_pix_loss)
        pr = distance(context, target, cfg.loss)
        cc = consistency(details["pred"], gather_tokens(context, sel.target_idx), cfg.cc_detach, cfg.loss)
        weighted = {"re": cfg.weight_re * re, "pr": cfg.weight_pr * pr, "cc": cfg.weight_cc * cc}
        per_sample = weighted["re"] + weighted["pr"] + weighted["cc"]
        details["panel_context"] = context * std + mean
        return StepTensors(per_sample, {k: v.mean() for k, v in weighted.items()}, {}, details)

    def forward_flops(self, cfg: Any, model_cfg: ModelConfig) -> float:
        """SimMIM's count plus a second full-sequence encoder pass and the head on all N tokens."""
        return self.mim_flops(cfg, model_cfg, encoder_passes=2, head_tokens_extra=model_cfg.num_patches())
