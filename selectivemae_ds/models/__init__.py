"""Pretraining models: SelectiveMAE, and MAE / CrossMAE baselines, on a timm-compatible ViT."""
from __future__ import annotations

from .config import ENCODER_PRESETS, METHODS, SIZES, MaskingConfig, ModelConfig
from .flops import flops_per_image
from .selective_mae import PretrainModel, PretrainOutput, patchify, unpatchify
from .token_selection import hog_patch_scores, psts_select, random_select, stage_weights
from .vit import ViTEncoder


def build_model(model_cfg: ModelConfig, masking_cfg: MaskingConfig) -> PretrainModel:
    """Validate both configs and build the model (raises ValueError naming the bad key)."""
    return PretrainModel(model_cfg, masking_cfg)


def timm_model_name(model_cfg: ModelConfig) -> str:
    """The timm architecture whose encoder weights ours map onto one-to-one."""
    return "vit_huge_patch14_224" if model_cfg.size == "huge" else f"vit_{model_cfg.size}_patch16_224"


__all__ = [
    "ENCODER_PRESETS",
    "METHODS",
    "SIZES",
    "MaskingConfig",
    "ModelConfig",
    "PretrainModel",
    "PretrainOutput",
    "ViTEncoder",
    "build_model",
    "flops_per_image",
    "hog_patch_scores",
    "patchify",
    "psts_select",
    "random_select",
    "stage_weights",
    "timm_model_name",
    "unpatchify",
]
