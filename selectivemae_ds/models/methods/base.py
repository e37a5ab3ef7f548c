"""What a pretraining method is: one `MethodSpec` subclass, registered by name.

A method owns everything that makes it itself, and the rest of the code asks
the registry (`selectivemae_ds.models.methods.get_spec`) instead of testing
its name:

| member                  | used by                                         |
|-------------------------|-------------------------------------------------|
| `name`, `config_cls`    | the TOML section `[<name>]` (config.build_config) |
| `validate`, `counts`    | config validation, `PretrainModel`, FLOPs        |
| `build_decoder`         | `PretrainModel.__init__`                         |
| `select`                | `PretrainModel` and `smae-bench model`           |
| `run`                   | `PretrainModel.forward` / `forward_details`      |
| `lr_scale`              | `schedules.peak_lr`                              |
| `default_grad_clip`, `no_weight_decay` | `optim.grad_clip` when unset; `engine.param_groups` |
| `forward_flops`         | `flops.flops_per_image` (throughput, MFU)        |
| `loss_terms`, `logged_stats`, `log_fields` | the trainer's log records     |

The base class is the masked-autoencoder family (MAE, CrossMAE, SelectiveMAE):
embed all patches, choose visible and target patches (`select`), encode the
visible ones, decode the targets, per-patch MSE. A method that works otherwise
(e.g. an encoder over the whole sequence with mask tokens, several branches and
loss terms) overrides `run` and returns its terms in `StepTensors.terms`.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from selectivemae_ds.errors import ConfigError

from ..decoder import CrossAttentionDecoder, SelfAttentionDecoder
from ..config import ENCODER_PRESETS, ModelConfig
from ..flops import cross_decoder_forward_flops, encoder_forward_flops
from ..patches import gather_tokens, patchify
from ..token_selection import random_select

if TYPE_CHECKING:
    from ..pretrain import PretrainModel


class Selection(NamedTuple):
    """Which patches one step uses. visible_idx: (B, V) int64, the encoder's input in
    order; target_idx: (B, T) int64, the patches in the loss; scores: (B, N) per-patch
    scores the rule used (None when it used none); stats: 0-dim tensors the method
    logs (see `MethodSpec.logged_stats`); details: per-sample tensors for pictures
    and tests (e.g. PSTS's `stage` (B,))."""

    visible_idx: Tensor
    target_idx: Tensor
    scores: Tensor | None
    stats: dict[str, Tensor]
    details: dict[str, Tensor]


class StepTensors(NamedTuple):
    """What `MethodSpec.run` returns for one batch.

    per_sample_loss: (B,) fp32, the total loss of each sample (its mean is the loss);
    terms: named 0-dim parts of the loss (weighted, they sum to the loss); empty for
    single-term methods; stats: 0-dim tensors to log (names in `logged_stats`);
    details: tensors for pictures (see `PretrainModel.forward_details`).
    """

    per_sample_loss: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor]
    details: dict[str, Tensor]


def check_ratio(section: str, key: str, value: float, *, closed_top: bool = False) -> None:
    """ConfigError unless value is in (0, 1) (or (0, 1] with closed_top)."""
    ok = 0.0 < value <= 1.0 if closed_top else 0.0 < value < 1.0
    if not ok:
        interval = "(0, 1]" if closed_top else "(0, 1)"
        raise ConfigError(f"{section}.{key}: must be in {interval}, got {value}")


def check_choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError unless value is one of choices."""
    if value not in choices:
        raise ConfigError(f"{section}.{key}: unknown value {value!r} (choose from {', '.join(choices)})")


class MethodSpec(ABC):
    """Base of every method; see the module docstring for who reads which member."""

    name: ClassVar[str]
    """Registry name, `model.method` value and TOML section name."""
    config_cls: ClassVar[type]
    """The method's config dataclass (its own ratios and options only)."""
    default_decoder_depth: ClassVar[int] = 12
    """Decoder blocks when `model.decoder_depth` is None."""
    decoder_kind: ClassVar[str] = "cross"
    """`cross` (queries = target positions over the encoder tokens) or `self` (MAE's
    full-sequence decoder)."""
    loss_terms: ClassVar[tuple[str, ...]] = ()
    """Keys of `StepTensors.terms` (named, weighted parts of the loss); the trainer
    logs each as `loss_<name>`. Empty for single-term methods."""
    logged_stats: ClassVar[tuple[str, ...]] = ()
    """Keys of `StepTensors.stats` the trainer averages over micro-batches and ranks
    and logs under the same names."""
    ratio_keys: ClassVar[tuple[str, str]] = ("mask_ratio", "decode_ratio")
    """Config keys that set the visible / target counts (named in count errors)."""
    default_grad_clip: ClassVar[float] = 0.0
    """`optim.grad_clip` when the config leaves it unset: the method's recipe (0 = no
    clipping, as MAE, CrossMAE and the public SelectiveMAE code)."""

    # --- configuration ---------------------------------------------------------------

    def default_config(self) -> Any:
        """A config with every default."""
        return self.config_cls()

    def config_from_dict(self, values: dict[str, Any]) -> Any:
        """Config from plain data already typed (a resolved config or checkpoint); unknown key -> ConfigError."""
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{self.name}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
        return self.config_cls(**values)

    @abstractmethod
    def counts(self, cfg: Any, num_patches: int) -> tuple[int, int]:
        """(visible, targets) per image for N patches."""

    def check(self, cfg: Any) -> None:
        """ConfigError naming `<name>.<key>` for a value out of its range (no model needed).

        Also run on the sections of methods other than `model.method` in a config file.
        """

    def validate(self, cfg: Any, model_cfg: ModelConfig) -> None:
        """ConfigError naming `<name>.<key>` (or `model.<key>`) for a bad value.

        `check`, then: the counts leave >= 1 visible and >= 1 target patch and the
        targets fit among the non-visible patches for this model's N.
        """
        if not isinstance(cfg, self.config_cls):
            raise ConfigError(f"{self.name}: expected a {self.config_cls.__name__}, got {type(cfg).__name__}")
        self.check(cfg)
        if self.decoder_kind == "self" and model_cfg.decoder_self_attn:
            raise ConfigError(f"model.decoder_self_attn: {self.name}'s decoder is self-attention already; set false")
        n = model_cfg.num_patches()
        visible, targets = self.counts(cfg, n)
        vis_key, tgt_key = (f"{self.name}.{k}" for k in self.ratio_keys)
        if visible < 1:
            raise ConfigError(f"{vis_key}: leaves no visible patch with {n} patches per image")
        if visible >= n:
            raise ConfigError(f"{vis_key}: leaves no masked patch with {n} patches per image")
        if targets < 1:
            raise ConfigError(f"{tgt_key}: leaves no target patch with {n} patches per image")
        if targets > n - visible:
            raise ConfigError(
                f"{tgt_key}: {targets} targets do not fit among the {n - visible} non-visible patches "
                f"({tgt_key} must be <= 1 - {vis_key})"
            )

    # --- model -----------------------------------------------------------------------

    def build_decoder(self, cfg: Any, model_cfg: ModelConfig, encoder_dim: int, grid: int) -> nn.Module:
        """The decoder of this method (`decoder_kind` picks the class)."""
        common = dict(encoder_dim=encoder_dim, dim=model_cfg.resolved_decoder_dim(),
                      depth=model_cfg.resolved_decoder_depth(), num_heads=model_cfg.resolved_decoder_heads(),
                      grid=grid, patch_size=model_cfg.resolved_patch_size(), attn_impl=model_cfg.attn_impl)
        if self.decoder_kind == "self":
            return SelfAttentionDecoder(**common)
        return CrossAttentionDecoder(**common, self_attn=model_cfg.decoder_self_attn,
                                     **self.cross_decoder_options(cfg, model_cfg))

    def no_weight_decay(self, cfg: Any) -> set[str]:
        """Parameter names exempt from weight decay besides norms and biases (ndim <= 1).

        Empty: MAE, CrossMAE and the public SelectiveMAE code (timm's weight-decay
        groups) decay the cls and mask tokens like every other matrix.
        """
        return set()

    def cross_decoder_options(self, cfg: Any, model_cfg: ModelConfig) -> dict[str, Any]:
        """Extra `CrossAttentionDecoder` arguments of this method (e.g. CrossMAE's fusion)."""
        return {}

    def select(self, model: PretrainModel, imgs: Tensor, patches: Tensor, progress: float | Tensor) -> Selection:
        """Choose the visible and target patches. imgs: (B, 3, H, W); patches: (B, N, D) embeddings.

        The default is MAE's uniform random masking: one random permutation per
        sample, the first V visible, the next T targets.
        """
        visible_idx, target_idx = random_select(imgs.shape[0], model.num_patches, model.num_visible,
                                                model.num_targets, imgs.device)
        return Selection(visible_idx, target_idx, None, {}, {})

    def encode(self, model: PretrainModel, patches: Tensor, visible_idx: Tensor) -> Tensor:
        """Encoder output the decoder reads: (B, 1 + V, D) (cls first)."""
        return model.encoder.forward_visible(patches, visible_idx)

    def run(self, model: PretrainModel, imgs: Tensor, progress: float | Tensor) -> StepTensors:
        """One batch: select, encode the visible patches, decode the targets, per-patch MSE."""
        patches = model.encoder.embed_patches(imgs)
        sel = self.select(model, imgs, patches, progress)
        latent = self.encode(model, patches, sel.visible_idx)
        pred = model.decoder(latent, sel.visible_idx, sel.target_idx)
        target, mean, std = pixel_targets(imgs, sel.target_idx, model.patch_size, model.model_cfg.norm_pix_loss)
        per_sample = (pred.float() - target).pow(2).mean(dim=-1).mean(dim=-1)
        details = {"visible_idx": sel.visible_idx, "target_idx": sel.target_idx, "pred": pred.float(),
                   "pred_pixels": pred.float() * std + mean, "target": target, **sel.details}
        if sel.scores is not None:
            details["hog"] = sel.scores
        return StepTensors(per_sample, {}, sel.stats, details)

    # --- schedules, FLOPs, logs ----------------------------------------------------------

    def lr_scale(self, cfg: Any) -> float:
        """Factor on blr * global_batch / 256 when `optim.scale_by_decode` is on."""
        return 1.0

    def forward_flops(self, cfg: Any, model_cfg: ModelConfig) -> float:
        """Forward matmul FLOPs per image (rule in `selectivemae_ds.models.flops`).

        Patch embedding on all N patches, the encoder on 1 + V tokens, the decoder
        embedding on 1 + V tokens, the decoder (cross: T queries over 1 + V tokens;
        self: 1 + N tokens) and the pixel head on the T targets.
        """
        dim, depth, _heads, _patch = ENCODER_PRESETS[model_cfg.size]
        pixels = model_cfg.resolved_patch_size() ** 2 * 3
        n = model_cfg.num_patches()
        visible, targets = self.counts(cfg, n)
        dec_dim, dec_depth = model_cfg.resolved_decoder_dim(), model_cfg.resolved_decoder_depth()
        flops = 2.0 * n * pixels * dim  # patch embedding (all N patches)
        flops += encoder_forward_flops(dim, depth, 1 + visible)
        flops += 2.0 * (1 + visible) * dim * dec_dim  # decoder_embed
        if self.decoder_kind == "self":
            flops += encoder_forward_flops(dec_dim, dec_depth, 1 + n)
        else:
            flops += cross_decoder_forward_flops(dec_dim, dec_depth, targets, 1 + visible,
                                                 model_cfg.decoder_self_attn)
        flops += 2.0 * targets * dec_dim * pixels  # pixel head on the targets
        return flops

    def log_fields(self, cfg: Any, progress: float) -> dict[str, Any]:
        """Host-side values for a log record at `progress` (no tensors, no sync)."""
        return {}


def pixel_targets(imgs: Tensor, target_idx: Tensor, patch: int, norm_pix: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Target pixels -> (target (B, T, p*p*3) fp32 as used by the loss, mean, std (B, T, 1)).

    With `norm_pix`, each patch is normalized by its own mean and (unbiased) std as
    MAE; mean/std are returned to map predictions back to pixels.
    """
    raw = gather_tokens(patchify(imgs.float(), patch), target_idx)
    if not norm_pix:
        return raw, torch.zeros_like(raw[..., :1]), torch.ones_like(raw[..., :1])
    mean = raw.mean(dim=-1, keepdim=True)
    std = (raw.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    return (raw - mean) / std, mean, std
