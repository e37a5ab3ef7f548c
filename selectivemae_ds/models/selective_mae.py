"""SelectiveMAE / MAE / CrossMAE forward: images -> (loss, per-sample loss, stats).

One model class for the three methods; they differ only in how the visible
and target patches are chosen and in the decoder:

| method       | visible (encoder)          | targets (loss)               | decoder              |
|--------------|----------------------------|------------------------------|----------------------|
| selectivemae | PSTS, floor(N(1-0.85))     | floor(N*0.25), by HOG score  | cross-attention, 12  |
| mae          | random, floor(N(1-0.75))   | all masked patches           | self-attention, 8    |
| crossmae     | random, floor(N(1-0.75))   | floor(N*0.25), random        | cross-attention, 12  |

The step is device-only: counts are static, the selection uses topk/gather/
scatter, and the stats are tensors (reading them is the caller's host sync).
Autocast is the caller's choice; the loss is computed in fp32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import MaskingConfig, ModelConfig
from .decoder import CrossAttentionDecoder, SelfAttentionDecoder, gather_tokens
from .flops import flops_per_image
from .token_selection import STAGE_FAR, STAGE_NEAR, STAGE_RANDOM, hog_patch_scores, psts_select, random_select
from .vit import ViTEncoder


class PretrainOutput(NamedTuple):
    """What `PretrainModel.forward` returns.

    loss: () mean of `per_sample_loss`; per_sample_loss: (B,) mean squared
    error over each sample's target patches (fp32); stats: 0-dim tensors,
    see `PretrainModel.forward`.
    """

    loss: Tensor
    per_sample_loss: Tensor
    stats: dict[str, Tensor]


def patchify(imgs: Tensor, p: int) -> Tensor:
    """imgs: (B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels (row, col, channel).

    The layout of MAE's `patchify`, so predictions are comparable with MAE's.
    """
    b, c, h, w = imgs.shape
    if h % p != 0 or w % p != 0:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of `patchify`. x: (B, N, p*p*C); h, w: the grid in PATCHES (N = h*w).

    Returns (B, C, h*p, w*p).
    """
    b, n, d = x.shape
    if n != h * w:
        raise ValueError(f"unpatchify: {n} patches do not form a {h}x{w} grid (h and w count patches, not pixels)")
    c = d // (p * p)
    if c * p * p != d:
        raise ValueError(f"unpatchify: patch vector of {d} values is not p*p*C for p={p}")
    x = x.reshape(b, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)


class StepTensors(NamedTuple):
    """Intermediate tensors of one forward (shapes in `PretrainModel.forward_details`)."""

    per_sample_loss: Tensor
    visible_idx: Tensor
    target_idx: Tensor
    stage: Tensor
    hog: Tensor | None
    pred: Tensor
    target: Tensor
    mean: Tensor
    std: Tensor


class PretrainModel(nn.Module):
    """Encoder + decoder + token selection for one of selectivemae / mae / crossmae.

    `encoder` is a `ViTEncoder` whose state dict loads strictly into timm's
    `vit_<size>_patch16_224` (`vit_huge_patch14_224`) with `num_classes=0`.
    """

    def __init__(self, model_cfg: ModelConfig, masking_cfg: MaskingConfig) -> None:
        super().__init__()
        model_cfg.validate()
        masking_cfg.validate(model_cfg.method, model_cfg.num_patches())
        self.model_cfg = model_cfg
        self.masking_cfg = masking_cfg
        self.method = model_cfg.method
        self.patch_size = model_cfg.resolved_patch_size()
        self.encoder = ViTEncoder(
            model_cfg.size,
            img_size=model_cfg.img_size,
            patch_size=self.patch_size,
            attn_impl=model_cfg.attn_impl,
            drop_path=model_cfg.drop_path,
        )
        self.num_patches = self.encoder.num_patches
        self.num_visible, self.num_targets = masking_cfg.counts(self.method, self.num_patches)
        depth = model_cfg.resolved_decoder_depth()
        common = dict(encoder_dim=self.encoder.embed_dim, dim=model_cfg.decoder_dim, depth=depth,
                      num_heads=model_cfg.decoder_heads, grid=self.encoder.grid, patch_size=self.patch_size,
                      attn_impl=model_cfg.attn_impl)
        if self.method == "mae":
            self.decoder: nn.Module = SelfAttentionDecoder(**common)
        else:
            self.decoder = CrossAttentionDecoder(**common, self_attn=model_cfg.decoder_self_attn)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in `named_parameters`) exempt from weight decay: the tokens.

        The position tables are buffers, never parameters, so they need no entry.
        """
        return {"encoder.cls_token", "decoder.mask_token"}

    def flops_per_image(self) -> float:
        """Training FLOPs per image (fwd + bwd); see `flops.flops_per_image`."""
        return flops_per_image(self.model_cfg, self.masking_cfg)

    def select(
        self, imgs: Tensor, patches: Tensor, progress: float | Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Choose patches. imgs: (B, 3, H, W), patches: (B, N, D).

        Returns visible_idx (B, V), target_idx (B, T), stage (B,) int64 and the
        HOG scores (B, N) (None for the random baselines, which do not need them).
        """
        b = imgs.shape[0]
        if self.method == "selectivemae":
            scores = hog_patch_scores(imgs, self.patch_size, self.masking_cfg.hog_bins)
            visible_idx, target_idx, stage = psts_select(scores, patches, progress, self.masking_cfg)
            return visible_idx, target_idx, stage, scores
        visible_idx, target_idx = random_select(b, self.num_patches, self.num_visible, self.num_targets, imgs.device)
        stage = torch.full((b,), STAGE_RANDOM, dtype=torch.long, device=imgs.device)
        return visible_idx, target_idx, stage, None

    def targets(self, imgs: Tensor, target_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Target pixels. -> (target (B, T, p*p*3) fp32 as used by the loss, mean, std (B, T, 1)).

        With `norm_pix_loss`, each patch is normalized by its own mean and
        (unbiased) std as MAE; mean/std are returned to map predictions back.
        """
        raw = gather_tokens(patchify(imgs.float(), self.patch_size), target_idx)
        if not self.model_cfg.norm_pix_loss:
            return raw, torch.zeros_like(raw[..., :1]), torch.ones_like(raw[..., :1])
        mean = raw.mean(dim=-1, keepdim=True)
        std = (raw.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (raw - mean) / std, mean, std

    def _run(self, imgs: Tensor, progress: float | Tensor) -> StepTensors:
        patches = self.encoder.embed_patches(imgs)
        visible_idx, target_idx, stage, scores = self.select(imgs, patches, progress)
        latent = self.encoder.forward_visible(patches, visible_idx)
        pred = self.decoder(latent, visible_idx, target_idx)
        target, mean, std = self.targets(imgs, target_idx)
        per_sample = (pred.float() - target).pow(2).mean(dim=-1).mean(dim=-1)
        return StepTensors(per_sample, visible_idx, target_idx, stage, scores, pred, target, mean, std)

    def forward(self, imgs: Tensor, progress: float | Tensor = 0.0) -> PretrainOutput:
        """imgs: (B, 3, H, W) ImageNet-normalized; progress: fraction of training done in [0, 1].

        stats (all tensors, no host sync; `.item()` them when logging):
        - `visible`, `targets`: () int64, patches per image seen by the encoder / in the loss;
        - `stage`: () float32, mean stage id over the batch (0 near, 1 far, 2 random;
          fractional inside a blend window; always 2 for the random baselines);
        - `stage_near`, `stage_far`, `stage_random`: () float32, fraction of samples in each stage.
        """
        out = self._run(imgs, progress)
        per_sample, stage, device = out.per_sample_loss, out.stage, imgs.device
        # torch.full fills on the device (no host-to-device copy of a Python int).
        stats = {
            "visible": torch.full((), self.num_visible, dtype=torch.long, device=device),
            "targets": torch.full((), self.num_targets, dtype=torch.long, device=device),
            "stage": stage.float().mean(),
            "stage_near": (stage == STAGE_NEAR).float().mean(),
            "stage_far": (stage == STAGE_FAR).float().mean(),
            "stage_random": (stage == STAGE_RANDOM).float().mean(),
        }
        return PretrainOutput(loss=per_sample.mean(), per_sample_loss=per_sample, stats=stats)

    def forward_details(self, imgs: Tensor, progress: float | Tensor = 0.0) -> dict[str, Tensor]:
        """Everything needed for pictures (call under `torch.no_grad()`).

        Returns:
        - `hog`: (B, N) HOG scores (computed for every method, for display);
        - `visible_idx`: (B, V), `target_idx`: (B, T), `stage`: (B,) int64;
        - `pred`: (B, T, p*p*3) decoder output in the LOSS space (per-patch
          normalized when `norm_pix_loss`), fp32;
        - `pred_pixels`: (B, T, p*p*3) `pred` mapped back to the input's pixel
          space (ImageNet-normalized) with each target patch's mean/std;
        - `target`: (B, T, p*p*3) the loss targets; `per_sample_loss`: (B,).
        """
        out = self._run(imgs, progress)
        pred = out.pred.float()
        hog = out.hog if out.hog is not None else hog_patch_scores(imgs, self.patch_size, self.masking_cfg.hog_bins)
        return {
            "hog": hog,
            "visible_idx": out.visible_idx,
            "target_idx": out.target_idx,
            "stage": out.stage,
            "pred": pred,
            "pred_pixels": pred * out.std + out.mean,
            "target": out.target,
            "per_sample_loss": out.per_sample_loss,
        }
