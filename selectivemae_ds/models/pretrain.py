"""The pretraining model: one class for every registered method.

`PretrainModel` holds the encoder (a timm-compatible ViT), the decoder the
method's spec builds, and the spec itself; `forward` runs the spec's step
(`MethodSpec.run`): images -> (loss, per-sample loss, loss terms, stats).
Which patches the encoder sees, which are reconstructed, the decoder, the lr
scale, the FLOP count and the logged stats all come from the spec
(`selectivemae_ds.models.methods`); nothing here tests a method's name.

The step is device-only for the built-in methods: counts are static, the
selection uses topk/gather/scatter, and the stats are tensors (reading them is
the caller's host sync). Autocast is the caller's choice; the loss is fp32.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from .config import ModelConfig
from .methods import get_spec
from .token_selection import hog_patch_scores
from .vit import ViTEncoder


class PretrainOutput(NamedTuple):
    """What `PretrainModel.forward` returns.

    loss: () mean of `per_sample_loss`; per_sample_loss: (B,) each sample's loss
    (fp32); terms: named () parts of the loss for methods with several (weighted,
    they sum to `loss`; empty otherwise); stats: () tensors the method logs (names
    in its spec's `logged_stats`).
    """

    loss: Tensor
    per_sample_loss: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor]


class PretrainModel(nn.Module):
    """Encoder + the method's decoder and selection, for any registered method.

    `encoder` is a `ViTEncoder` whose state dict loads strictly into timm's
    `vit_<size>_patch16_224` (`vit_huge_patch14_224`) with `num_classes=0`.
    """

    def __init__(self, model_cfg: ModelConfig, method_cfg: Any = None) -> None:
        super().__init__()
        model_cfg.validate()
        self.spec = get_spec(model_cfg.method)
        method_cfg = self.spec.default_config() if method_cfg is None else method_cfg
        self.spec.validate(method_cfg, model_cfg)
        self.model_cfg = model_cfg
        self.method_cfg = method_cfg
        self.patch_size = model_cfg.resolved_patch_size()
        self.encoder = ViTEncoder(
            model_cfg.size,
            img_size=model_cfg.img_size,
            patch_size=self.patch_size,
            attn_impl=model_cfg.attn_impl,
            drop_path=model_cfg.drop_path,
        )
        self.num_patches = self.encoder.num_patches
        self.num_visible, self.num_targets = self.spec.counts(method_cfg, self.num_patches)
        self.decoder = self.spec.build_decoder(method_cfg, model_cfg, self.encoder.embed_dim, self.encoder.grid)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in `named_parameters`) exempt from weight decay besides norms
        and biases: the method's (none for the built-ins, which decay the cls and mask tokens
        as their reference code does). The position tables are buffers, never parameters."""
        return self.spec.no_weight_decay(self.method_cfg)

    def flops_per_image(self) -> float:
        """Training FLOPs per image (fwd + bwd): 3 x the spec's forward count."""
        return 3.0 * self.spec.forward_flops(self.method_cfg, self.model_cfg)

    def forward(self, imgs: Tensor, progress: float | Tensor = 0.0) -> PretrainOutput:
        """imgs: (B, 3, H, W) ImageNet-normalized; progress: fraction of training done in [0, 1].

        Tensors only (no host sync); `.item()` the stats when logging.
        """
        out = self.spec.run(self, imgs, progress)
        return PretrainOutput(out.per_sample_loss.mean(), out.per_sample_loss, out.terms, out.stats)

    def forward_details(self, imgs: Tensor, progress: float | Tensor = 0.0) -> dict[str, Tensor]:
        """Everything needed for pictures (call under `torch.no_grad()`).

        For the masked-autoencoder methods:
        - `hog`: (B, N) HOG scores (computed for display when the method uses none);
        - `visible_idx`: (B, V), `target_idx`: (B, T);
        - `pred`: (B, T, p*p*3) decoder output in the LOSS space (per-patch
          normalized when `norm_pix_loss`), fp32;
        - `pred_pixels`: (B, T, p*p*3) `pred` mapped back to the input's pixel
          space (ImageNet-normalized) with each target patch's mean/std;
        - `target`: (B, T, p*p*3) the loss targets; `per_sample_loss`: (B,);
        - whatever else the method adds (selectivemae: `stage` (B,) int64).
        """
        out = self.spec.run(self, imgs, progress)
        details = dict(out.details)
        if "hog" not in details:
            details["hog"] = hog_patch_scores(imgs, self.patch_size)
        details["per_sample_loss"] = out.per_sample_loss
        return details
