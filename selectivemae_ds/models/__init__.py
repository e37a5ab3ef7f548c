"""Pretraining models: SelectiveMAE, and MAE / CrossMAE baselines, on a timm-compatible ViT.

Methods are registered specs (`selectivemae_ds.models.methods`); `build_model`
builds any of them from the shared `[model]` config and the method's own config.
"""
from __future__ import annotations

from typing import Any


from .config import DECODER_PRESETS, ENCODER_PRESETS, SIZES, ModelConfig
from .flops import flops_per_image
from .methods import get_spec, method_names
from .patches import gather_tokens, patchify, unpatchify
from .pretrain import PretrainModel, PretrainOutput
from .token_selection import hog_patch_scores, psts_select, random_select, stage_weights
from .vit import ViTEncoder


def build_model(model_cfg: ModelConfig, method_cfg: Any = None) -> PretrainModel:
    """Validate both configs and build the model (ConfigError naming the bad key).

    method_cfg: the config of `model_cfg.method` (None = that method's defaults).
    """
    return PretrainModel(model_cfg, method_cfg)


def timm_model_name(model_cfg: ModelConfig) -> str:
    """The timm architecture whose encoder weights ours map onto one-to-one."""
    return "vit_huge_patch14_224" if model_cfg.size == "huge" else f"vit_{model_cfg.size}_patch16_224"


__all__ = [
    "DECODER_PRESETS",
    "ENCODER_PRESETS",
    "SIZES",
    "ModelConfig",
    "PretrainModel",
    "PretrainOutput",
    "ViTEncoder",
    "build_model",
    "flops_per_image",
    "gather_tokens",
    "get_spec",
    "hog_patch_scores",
    "method_names",
    "patchify",
    "psts_select",
    "random_select",
    "stage_weights",
    "timm_model_name",
    "unpatchify",
]
